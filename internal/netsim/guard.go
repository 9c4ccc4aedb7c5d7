package netsim

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// outerEnv carries, from the test to the processes it starts with
// [Net.Command], the inode of the test's own network namespace.
const outerEnv = "NETSIM_OUTER_NETNS"

// CheckIsolated returns an error unless the calling process is inside a
// network namespace other than the test's (the one [Net.Command] was called
// in) and PID 1's (where /proc/1 is readable), whose interfaces are exactly
// lo and ifaces, with no default route for IPv4 or IPv6. Every process of a
// simulation calls it before it opens a socket: whatever went wrong in the
// set-up, a process that could reach a real address refuses to start.
//
// It reads /proc and /sys only (no socket of its own). The process must run
// in one namespace as a whole (started with "ip netns exec"): it checks the
// namespace of the calling thread's /proc/self.
func CheckIsolated(ifaces ...string) error {
	self, err := nsInode("/proc/self/ns/net")
	if err != nil {
		return fmt.Errorf("netsim: refusing to run: %w", err)
	}
	outer, err := strconv.ParseUint(os.Getenv(outerEnv), 10, 64)
	if err != nil {
		return fmt.Errorf("netsim: refusing to run: %s is not set: start this process with Net.Command", outerEnv)
	}
	if self == outer {
		return fmt.Errorf("netsim: refusing to run: this process is in the test's own network namespace, not in one the test created")
	}
	// PID 1's namespace is the machine's; reading it needs more than root
	// in some containers, where the checks below still hold.
	if root, err := nsInode("/proc/1/ns/net"); err == nil && self == root {
		return fmt.Errorf("netsim: refusing to run: this process is in the machine's own network namespace (that of PID 1), not in one the test created")
	}

	entries, err := os.ReadDir("/sys/class/net")
	if err != nil {
		return fmt.Errorf("netsim: refusing to run: listing interfaces: %w", err)
	}
	var have []string
	for _, e := range entries {
		have = append(have, e.Name())
	}
	want := append([]string{"lo"}, ifaces...)
	slices.Sort(have)
	slices.Sort(want)
	if !slices.Equal(have, want) {
		return fmt.Errorf("netsim: refusing to run: interfaces are %v, expected exactly %v", have, want)
	}

	if r, err := defaultRoute4(); err != nil {
		return fmt.Errorf("netsim: refusing to run: %w", err)
	} else if r != "" {
		return fmt.Errorf("netsim: refusing to run: an IPv4 default route exists (via %s)", r)
	}
	if r, err := defaultRoute6(); err != nil {
		return fmt.Errorf("netsim: refusing to run: %w", err)
	} else if r != "" {
		return fmt.Errorf("netsim: refusing to run: an IPv6 default route exists (via %s)", r)
	}
	return nil
}

func nsInode(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("reading the network namespace %s: %w", path, err)
	}
	return st.Ino, nil
}

// defaultRoute4 returns the interface of an IPv4 default route in
// /proc/net/route (destination and mask 0), or "" if there is none.
func defaultRoute4() (string, error) {
	f, err := os.Open("/proc/net/route")
	if err != nil {
		return "", fmt.Errorf("reading the IPv4 routes: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		// Iface Destination Gateway Flags RefCnt Use Metric Mask ...
		if len(fields) >= 8 && fields[1] == "00000000" && fields[7] == "00000000" {
			return fields[0], nil
		}
	}
	return "", sc.Err()
}

// defaultRoute6 returns the interface of an IPv6 default route in
// /proc/net/ipv6_route (destination ::/0), or "" if there is none. The
// kernel lists unreachable entries for ::/0 on lo in some namespaces; those
// carry the reject flag (0x0200) and lead nowhere, so they do not count.
func defaultRoute6() (string, error) {
	f, err := os.Open("/proc/net/ipv6_route")
	if err != nil {
		if os.IsNotExist(err) { // IPv6 disabled: no route at all
			return "", nil
		}
		return "", fmt.Errorf("reading the IPv6 routes: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// dest destlen src srclen nexthop metric refcnt use flags iface
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[0] != strings.Repeat("0", 32) || fields[1] != "00" {
			continue
		}
		var flags uint64
		if _, err := fmt.Sscanf(fields[8], "%x", &flags); err == nil && flags&0x0200 != 0 {
			continue
		}
		return fields[9], nil
	}
	return "", sc.Err()
}
