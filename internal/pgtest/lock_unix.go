//go:build unix

package pgtest

import (
	"fmt"
	"os"
	"syscall"
)

// flock takes a shared or an exclusive flock on f, waiting for it; on a
// file already locked, it converts the lock. The lock dies with the
// process.
func flock(f *os.File, exclusive bool) error {
	how := syscall.LOCK_SH
	if exclusive {
		how = syscall.LOCK_EX
	}
	if err := syscall.Flock(int(f.Fd()), how); err != nil {
		return fmt.Errorf("locking %s: %w", f.Name(), err)
	}
	return nil
}
