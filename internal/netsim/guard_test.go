package netsim_test

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/p2ptls/autotls/internal/netsim"
)

// TestCheckIsolatedRefusesTheTestsNamespace: the test process itself is in
// the machine's network, so the check must refuse there, whether or not it
// knows the test's namespace.
func TestCheckIsolatedRefusesTheTestsNamespace(t *testing.T) {
	t.Setenv("NETSIM_OUTER_NETNS", "")
	if err := netsim.CheckIsolated(); err == nil {
		t.Fatal("CheckIsolated accepted a process not started by Net.Command")
	}
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &st); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("no network namespaces here, and CI must run this test: %v", err)
		}
		t.Skipf("no network namespaces here: %v", err)
	}
	t.Setenv("NETSIM_OUTER_NETNS", strconv.FormatUint(st.Ino, 10))
	err := netsim.CheckIsolated()
	if err == nil || !strings.Contains(err.Error(), "test's own network namespace") {
		t.Fatalf("CheckIsolated in the test's namespace = %v, want a refusal naming it", err)
	}
}

// TestCheckIsolatedRefusesUnsafeNamespaces runs the check in namespaces the
// test made unsafe on purpose (still joined only to each other): a default
// route, an interface more than expected.
func TestCheckIsolatedRefusesUnsafeNamespaces(t *testing.T) {
	cases := []struct {
		name, want string
		unsafe     []string // ip(8) arguments run in the namespace checked
	}{
		{"safe", "", nil},
		{"ipv4-default-route", "IPv4 default route", []string{"route", "add", "default", "via", "5.1.0.1"}},
		{"ipv6-default-route", "IPv6 default route", []string{"-6", "route", "add", "default", "via", "2a0f:5:1::1"}},
		{"unexpected-interface", "interfaces are", []string{"link", "add", "extra0", "type", "veth", "peer", "name", "extra1"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			n := netsim.New(t)
			ns, peer := n.NS("check"), n.NS("peer")
			n.Link(ns, "up0", []string{"5.1.0.2/24", "2a0f:5:1::2/64"}, peer, "down0", []string{"5.1.0.1/24", "2a0f:5:1::1/64"})
			if tc.unsafe != nil {
				if out, err := n.Command(ns, "ip", tc.unsafe...).CombinedOutput(); err != nil {
					t.Fatalf("ip %v: %v: %s", tc.unsafe, err, out)
				}
			}
			p := startRole(t, n, ns, "check", []string{"up0"})
			lines := p.exit(t, 30*time.Second)
			switch {
			case tc.want == "" && (len(lines) != 1 || lines[0].Ev != "isolated"):
				t.Fatalf("the check refused a safe namespace: %+v", lines)
			case tc.want != "" && (len(lines) != 1 || lines[0].Ev != "error" || !strings.Contains(lines[0].Err, tc.want)):
				t.Fatalf("the check said %+v, want one refusal with %q", lines, tc.want)
			}
		})
	}
}
