package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// checkHTTPS takes the curl command the node printed,
//
//	curl --cacert <root.pem> --resolve <name>:<port>:<ip> https://<name>:<port>/
//
// and does what it says with an HTTP/2 Go client trusting only that root:
// 200 over HTTP/2, the node's JSON with CORS for any origin. If curl is
// installed, it also runs the command itself and expects HTTP/2 200.
func checkHTTPS(t *testing.T, line string) {
	t.Helper()
	f := strings.Fields(line[strings.Index(line, "curl "):])
	if len(f) != 6 || f[1] != "--cacert" || f[3] != "--resolve" {
		t.Fatalf("not the curl command: %q", line)
	}
	rootFile, resolve, url := f[2], f[4], f[5]
	i := strings.LastIndex(resolve, ":")
	name, ip := resolve[:i], resolve[i+1:] // name is <name>:<port>
	_, port, err := net.SplitHostPort(name)
	if err != nil {
		t.Fatalf("--resolve %s: %v", resolve, err)
	}
	pem, err := os.ReadFile(rootFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		t.Fatalf("no certificate in %s", rootFile)
	}
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, net.JoinHostPort(ip, port))
		},
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Origin", "http://localhost:8080")
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	var info nodeInfo
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil {
		t.Fatalf("GET %s: %s: %v", url, resp.Status, err)
	}
	if resp.StatusCode != http.StatusOK || resp.Proto != "HTTP/2.0" || resp.Header.Get("Access-Control-Allow-Origin") != "*" {
		t.Fatalf("GET %s: %s %s, CORS %q; want 200 over HTTP/2 for any origin", url, resp.Proto, resp.Status, resp.Header.Get("Access-Control-Allow-Origin"))
	}
	if !strings.HasPrefix(info.PeerID, "12D3Koo") || info.Agent != agent || len(info.Addrs) == 0 {
		t.Fatalf("GET %s: %+v", url, info)
	}
	t.Logf("GET %s: %s %s, peer %s, %d addresses", url, resp.Proto, resp.Status, info.PeerID, len(info.Addrs))

	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Log("no curl installed; the Go client above did what the command says")
		return
	}
	out, err := exec.CommandContext(t.Context(), curl, append(f[1:], "-sS", "-i", "--max-time", "10")...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", line, err, out)
	}
	if !strings.HasPrefix(string(out), "HTTP/2 200") {
		t.Fatalf("%s answered:\n%s", strings.Join(f, " "), out)
	}
}
