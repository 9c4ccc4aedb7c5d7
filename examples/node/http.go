package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	ma "github.com/multiformats/go-multiaddr"
)

// nodeInfo is what the node serves over HTTPS on its WSS port.
type nodeInfo struct {
	PeerID string   `json:"peerID"`
	Agent  string   `json:"agent"`
	Addrs  []string `json:"addrs"`
}

// agent is the node's libp2p user agent, sent in identify and served over
// HTTPS.
const agent = "autotls-example-node"

// infoHandler serves the host's PeerID, agent and addresses as JSON at /,
// to any origin (a page served from elsewhere fetch()es it). The host is
// set once it is built; until then it answers 503.
type infoHandler struct {
	agent string
	h     atomic.Pointer[host.Host]
}

func (i *infoHandler) set(h host.Host) { i.h.Store(&h) }

func (i *infoHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Access-Control-Allow-Origin", "*")
	w.Header().Set("Timing-Allow-Origin", "*") // lets the page read the protocol (h2) from Resource Timing
	if r.URL.Path != "/" {
		http.NotFound(w, r)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "GET only", http.StatusMethodNotAllowed)
		return
	}
	hp := i.h.Load()
	if hp == nil {
		http.Error(w, "starting", http.StatusServiceUnavailable)
		return
	}
	h := *hp
	info := nodeInfo{PeerID: h.ID().String(), Agent: i.agent, Addrs: []string{}}
	for _, a := range h.Addrs() {
		info.Addrs = append(info.Addrs, a.String())
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(info)
}

// httpAddrs returns the host's announced /tls/.../http addresses.
func httpAddrs(h host.Host) []ma.Multiaddr {
	var out []ma.Multiaddr
	for _, a := range h.Addrs() {
		if _, err := a.ValueForProtocol(ma.P_HTTP); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// httpsTarget reads an announced /ipX/<ip>/tcp/<port>/tls/sni/<name>/http
// address: the URL (https://<name>:<port>/) and the IP to reach name at.
func httpsTarget(a ma.Multiaddr) (url, name, port, ip string, ok bool) {
	name, err1 := a.ValueForProtocol(ma.P_SNI)
	port, err2 := a.ValueForProtocol(ma.P_TCP)
	ip, err3 := a.ValueForProtocol(ma.P_IP4)
	if err3 != nil {
		ip, err3 = a.ValueForProtocol(ma.P_IP6)
	}
	if err1 != nil || err2 != nil || err3 != nil {
		return "", "", "", "", false
	}
	return "https://" + net.JoinHostPort(name, port) + "/", name, port, ip, true
}

// printHTTPAddrs prints the HTTPS addresses and, for the first, a curl
// command trusting rootFile.
func printHTTPAddrs(h host.Host, rootFile string) {
	addrs := httpAddrs(h)
	if len(addrs) == 0 {
		return
	}
	step("HTTPS on the same port (JSON: PeerID, agent, addresses):")
	for _, a := range addrs {
		fmt.Printf("    %s\n", a)
	}
	if url, name, port, ip, ok := httpsTarget(addrs[0]); ok && rootFile != "" {
		step("  curl --cacert %s --resolve %s:%s:%s %s", rootFile, name, port, ip, url)
	}
}

// httpsCheck GETs the node's first HTTPS address over HTTP/2, trusting only
// roots, and returns the URL.
func httpsCheck(ctx context.Context, h host.Host, roots *x509.CertPool) (string, error) {
	addrs := httpAddrs(h)
	if len(addrs) == 0 {
		return "", fmt.Errorf("no /http address announced")
	}
	url, _, port, ip, ok := httpsTarget(addrs[0])
	if !ok {
		return "", fmt.Errorf("cannot read %s", addrs[0])
	}
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, net.JoinHostPort(ip, port))
		},
	}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var info nodeInfo
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&info); err != nil {
		return "", fmt.Errorf("GET %s: %s: %w", url, resp.Status, err)
	}
	if resp.StatusCode != http.StatusOK || info.PeerID != h.ID().String() {
		return "", fmt.Errorf("GET %s: %s, peer %q", url, resp.Status, info.PeerID)
	}
	step("self-check: GET %s answered %s over %s", url, resp.Status, resp.Proto)
	return url, nil
}
