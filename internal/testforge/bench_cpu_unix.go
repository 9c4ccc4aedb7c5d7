//go:build unix

package testforge

import (
	"syscall"
	"time"
)

// ProcessCPUTime returns the CPU time (user and system) the process has
// used so far, for benchmarks that relate elapsed time to the CPU it took.
// ok is false where the platform does not tell.
func ProcessCPUTime() (d time.Duration, ok bool) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, false
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), true
}
