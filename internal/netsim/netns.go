// Package netsim builds a simulated internet for tests: Linux network
// namespaces joined by veth pairs, with public-range addresses, routes only
// between the simulated prefixes, and nftables rules for NATs and
// firewalls. Nothing in it is connected to the machine's own namespace, and
// no namespace has a default route, so no packet can leave the simulation.
//
// A socket belongs to the network namespace of the thread that creates it,
// so each namespace runs its own process: the test re-executes its own
// binary with [Net.Command], and that process calls [CheckIsolated] before
// it opens any socket.
//
// It needs root, ip(8) and nft(8); [New] skips the test where they are
// missing, and fails it instead when the environment variable CI is "true".
package netsim

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
)

// The simulated prefixes: every address of a simulation is in one of them,
// and routes exist only towards them. manet.IsPublicAddr treats both as
// public (they are not documentation, benchmarking or private ranges).
var (
	Prefix4 = netip.MustParsePrefix("5.0.0.0/8")
	Prefix6 = netip.MustParsePrefix("2a0f:5::/32")
)

// namePrefix starts the name of every namespace a simulation creates; the
// creating process's PID follows, so that leftovers of a crashed run can be
// told from the namespaces of a run still going.
const namePrefix = "asim-"

var (
	seq          atomic.Int64
	leftoversRun sync.Once
)

// Net is one simulation's set of namespaces. It is not safe for concurrent
// use; create one per (sub)test.
type Net struct {
	tb     testing.TB
	prefix string
	nss    []string
}

// New returns an empty simulation whose namespaces are deleted when tb
// ends. It skips tb with the reason when namespaces cannot be created here
// (not root, no ip or nft), or fails it when CI is set (as browsertest). The first call in
// a process also deletes namespaces left by earlier runs that crashed.
func New(tb testing.TB) *Net {
	tb.Helper()
	if reason := unavailable(); reason != "" {
		if os.Getenv("CI") != "" {
			tb.Fatalf("netsim: the simulated internet cannot run in CI: %s", reason)
		}
		tb.Skipf("netsim: skipping the simulated internet: %s", reason)
	}
	leftoversRun.Do(func() { removeLeftovers(tb) })
	n := &Net{tb: tb, prefix: fmt.Sprintf("%s%d-%d-", namePrefix, os.Getpid(), seq.Add(1))}
	tb.Cleanup(n.close)
	return n
}

func unavailable() string {
	if os.Geteuid() != 0 {
		return "network namespaces need root (run as root, as CI does)"
	}
	for _, bin := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(bin); err != nil {
			return bin + " is not installed (Debian: apt-get install iproute2 nftables)"
		}
	}
	// Root in a container may still lack the right to make namespaces.
	if _, err := exec.LookPath("unshare"); err == nil {
		if out, err := exec.Command("unshare", "--net", "true").CombinedOutput(); err != nil {
			return fmt.Sprintf("creating a network namespace is not permitted here: %v: %s", err, bytes.TrimSpace(out))
		}
	}
	return ""
}

// removeLeftovers deletes namespaces of this package whose creating process
// is gone.
func removeLeftovers(tb testing.TB) {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		tb.Fatalf("netsim: ip netns list: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		rest, ok := strings.CutPrefix(name, namePrefix)
		if !ok {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid <= 0 {
			continue
		}
		if syscall.Kill(pid, 0) == syscall.ESRCH {
			if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
				tb.Logf("netsim: removing leftover namespace %s: %v: %s", name, err, out)
			}
		}
	}
}

func (n *Net) close() {
	// Deleting a namespace deletes its veths, and their peers with them.
	for i := len(n.nss) - 1; i >= 0; i-- {
		if out, err := exec.Command("ip", "netns", "del", n.nss[i]).CombinedOutput(); err != nil {
			n.tb.Errorf("netsim: deleting namespace %s: %v: %s", n.nss[i], err, out)
		}
	}
	n.nss = nil
}

// NS creates a namespace for name, with lo up, and returns its full name.
func (n *Net) NS(name string) string {
	n.tb.Helper()
	full := n.prefix + name
	n.ip("netns", "add", full)
	n.nss = append(n.nss, full)
	n.ip("-n", full, "link", "set", "lo", "up")
	return full
}

// Link joins namespaces a and b with a veth pair, named ifA in a and ifB in
// b (never present in the machine's namespace), gives each end its
// addresses (CIDR notation, no duplicate address detection) and brings both
// up.
func (n *Net) Link(a, ifA string, addrsA []string, b, ifB string, addrsB []string) {
	n.tb.Helper()
	n.ip("link", "add", "name", ifA, "netns", a, "type", "veth", "peer", "name", ifB, "netns", b)
	for _, end := range []struct {
		ns, dev string
		addrs   []string
	}{{a, ifA, addrsA}, {b, ifB, addrsB}} {
		for _, addr := range end.addrs {
			args := []string{"-n", end.ns, "addr", "add", addr, "dev", end.dev}
			if strings.Contains(addr, ":") {
				args = append(args, "nodad")
			}
			n.ip(args...)
		}
		n.ip("-n", end.ns, "link", "set", end.dev, "up")
	}
}

// Addr adds an address (CIDR) to dev in ns, without duplicate address
// detection.
func (n *Net) Addr(ns, dev, addr string) {
	n.tb.Helper()
	args := []string{"-n", ns, "addr", "add", addr, "dev", dev}
	if strings.Contains(addr, ":") {
		args = append(args, "nodad")
	}
	n.ip(args...)
}

// Route adds a route to dst via gateway in ns. dst must be inside a
// simulated prefix: a default route would defeat [CheckIsolated].
func (n *Net) Route(ns, dst, via string) {
	n.tb.Helper()
	p, err := netip.ParsePrefix(dst)
	if err != nil {
		n.tb.Fatalf("netsim: route %q: %v", dst, err)
	}
	if !(Prefix4.Overlaps(p) && p.Bits() >= Prefix4.Bits()) && !(Prefix6.Overlaps(p) && p.Bits() >= Prefix6.Bits()) {
		n.tb.Fatalf("netsim: route to %s refused: routes stay inside %s and %s", dst, Prefix4, Prefix6)
	}
	n.ip("-n", ns, "route", "add", dst, "via", via)
}

// Forwarding turns IPv4 and IPv6 forwarding on in ns (a router).
func (n *Net) Forwarding(ns string) {
	n.tb.Helper()
	n.exec(ns, nil, "sh", "-c",
		"echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")
}

// Nft loads an nftables ruleset into ns.
func (n *Net) Nft(ns, ruleset string) {
	n.tb.Helper()
	n.exec(ns, strings.NewReader(ruleset), "nft", "-f", "-")
}

// Command returns a command that runs name with args inside ns, with the
// environment of the test plus what [CheckIsolated] needs. Add to its Env;
// do not replace it.
func (n *Net) Command(ns, name string, args ...string) *exec.Cmd {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.Env = os.Environ()
	if ino, err := nsInode("/proc/self/ns/net"); err == nil {
		cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%d", outerEnv, ino))
	}
	return cmd
}

func (n *Net) exec(ns string, stdin *strings.Reader, name string, args ...string) {
	n.tb.Helper()
	cmd := n.Command(ns, name, args...)
	if stdin != nil {
		cmd.Stdin = stdin
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		n.tb.Fatalf("netsim: in %s: %s %s: %v: %s", ns, name, strings.Join(args, " "), err, out.String())
	}
}

func (n *Net) ip(args ...string) {
	n.tb.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		n.tb.Fatalf("netsim: ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}
