//go:build !unix

package testforge

import "time"

// ProcessCPUTime returns the CPU time (user and system) the process has
// used so far, for benchmarks that relate elapsed time to the CPU it took.
// ok is false where the platform does not tell, as here.
func ProcessCPUTime() (d time.Duration, ok bool) { return 0, false }
