package main

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestNodeOffline runs the example as a newcomer does (`go run
// ./examples/node`, here the test binary re-executed as the program): with
// no internet it must print a /tls/sni/.../ws address and the local root's
// path, pass its WSS self-check, and stop cleanly on Ctrl-C.
func TestNodeOffline(t *testing.T) {
	if os.Getenv("AUTOTLS_EXAMPLE_NODE") == "1" {
		os.Args = []string{"node", "-http", ""}
		main()
		return
	}
	cmd, lines := startNode(t, "TestNodeOffline", "1")
	var sawAddr, sawRoot, sawCheck bool
	var curlLine string
	timeout := time.After(60 * time.Second)
wait:
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("the node exited early")
			}
			t.Log(l)
			sawAddr = sawAddr || (strings.Contains(l, "/tls/sni/") && strings.Contains(l, "/ws/p2p/"))
			sawRoot = sawRoot || strings.Contains(l, "local CA root")
			sawCheck = sawCheck || strings.Contains(l, "self-check: a second host dialed")
			if strings.Contains(l, "curl --cacert") {
				curlLine = l
			}
			if strings.Contains(l, "serving; press Ctrl-C") {
				break wait
			}
		case <-timeout:
			t.Fatal("the node did not become ready")
		}
	}
	if !sawAddr || !sawRoot || !sawCheck {
		t.Fatalf("address printed %v, root path printed %v, self-check passed %v", sawAddr, sawRoot, sawCheck)
	}
	if curlLine == "" {
		t.Fatal("the node printed no curl command for its HTTPS address")
	}
	checkHTTPS(t, curlLine)
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	for range lines {
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the node did not stop cleanly: %v", err)
	}
}

// TestNodeMetrics runs the example as `go run ./examples/node -metrics
// 127.0.0.1:0` (the test binary re-executed as the program): it prints a
// line per state of its certificate manager, and the
// autotls_certificate_expiry_timestamp_seconds it serves over HTTP is the
// NotAfter of the certificate its WSS listener serves.
func TestNodeMetrics(t *testing.T) {
	if os.Getenv("AUTOTLS_EXAMPLE_NODE") == "metrics" {
		os.Args = []string{"node", "-http", "", "-metrics", "127.0.0.1:0"}
		main()
		return
	}
	cmd, lines := startNode(t, "TestNodeMetrics", "metrics")

	metricsRe := regexp.MustCompile(`metrics: (http://127\.0\.0\.1:\d+/metrics)`)
	addrRe := regexp.MustCompile(`^\s*/ip4/127\.0\.0\.1/tcp/(\d+)/tls/sni/([^/]+)/ws/p2p/`)
	var metricsURL, port, sni string
	var states []string
	timeout := time.After(60 * time.Second)
wait:
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("the node exited early")
			}
			t.Log(l)
			if m := metricsRe.FindStringSubmatch(l); m != nil {
				metricsURL = m[1]
			}
			if m := addrRe.FindStringSubmatch(l); m != nil && port == "" {
				port, sni = m[1], m[2]
			}
			if _, rest, ok := strings.Cut(l, "] status "); ok {
				states = append(states, strings.SplitN(rest, ":", 2)[0])
			}
			if strings.Contains(l, "serving; press Ctrl-C") {
				break wait
			}
		case <-timeout:
			t.Fatal("the node did not become ready")
		}
	}
	if metricsURL == "" || port == "" {
		t.Fatalf("metrics URL %q, browser address port %q", metricsURL, port)
	}
	// The node subscribes once the host is up: the first line is the
	// state then, and one follows for each state after it.
	if all := []string{"waiting_broker", "issuing", "valid"}; len(states) == 0 || !slices.Equal(states, all[len(all)-min(len(states), len(all)):]) {
		t.Errorf("status lines for %v, want the last of %v", states, all)
	}

	// The trust in the certificate is the node's own self-check's
	// business; this looks at its expiry only.
	conn, err := tls.Dial("tcp", net.JoinHostPort("127.0.0.1", port), &tls.Config{ServerName: sni, InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	notAfter := conn.ConnectionState().PeerCertificates[0].NotAfter
	conn.Close()

	resp, err := http.Get(metricsURL)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	var expiry string
	for _, l := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(l, "autotls_certificate_expiry_timestamp_seconds "); ok {
			expiry = v
		}
	}
	v, err := strconv.ParseFloat(expiry, 64)
	if err != nil || v != float64(notAfter.Unix()) {
		t.Errorf("autotls_certificate_expiry_timestamp_seconds %q, the served certificate's NotAfter is %d (%v)", expiry, notAfter.Unix(), notAfter)
	}
	if !strings.Contains(string(body), `autotls_state{state="valid"} 1`) {
		t.Errorf("the metrics do not say valid:\n%s", body)
	}

	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	for range lines {
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the node did not stop cleanly: %v", err)
	}
}

// startNode re-executes the test binary as the example program: test is
// the test that runs main() when AUTOTLS_EXAMPLE_NODE is mode. It returns
// the process and its stdout, a line at a time; the process is killed when
// the test ends.
func startNode(t *testing.T, test, mode string) (*exec.Cmd, <-chan string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+test+"$")
	cmd.Env = append(os.Environ(), "AUTOTLS_EXAMPLE_NODE="+mode)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	lines := make(chan string)
	go func() {
		defer close(lines)
		s := bufio.NewScanner(out)
		for s.Scan() {
			lines <- s.Text()
		}
	}()
	return cmd, lines
}
