package main

import (
	"bufio"
	"os"
	"os/exec"
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
	cmd := exec.Command(os.Args[0], "-test.run=^TestNodeOffline$")
	cmd.Env = append(os.Environ(), "AUTOTLS_EXAMPLE_NODE=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()

	lines := make(chan string)
	go func() {
		defer close(lines)
		s := bufio.NewScanner(out)
		for s.Scan() {
			lines <- s.Text()
		}
	}()
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
