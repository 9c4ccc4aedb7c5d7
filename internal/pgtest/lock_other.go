//go:build !unix

package pgtest

import "os"

// flock does nothing where there is no flock: .ci/postgres.sh, which
// starts the server that tests stop, runs on Linux.
func flock(*os.File, bool) error { return nil }
