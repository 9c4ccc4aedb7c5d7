package autotls

// Child processes of the test binary, for the tests of hosts in several
// processes sharing one storage (budget_test.go, fleet_test.go). The
// parent runs the forge and a CA proxy; each child runs hosts pointed at
// them, as TestChildProcess, and reports what its hosts do as JSON lines
// on its standard output.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
	"github.com/p2ptls/autotls/internal/testforge"
	"github.com/p2ptls/autotls/storage"
	"github.com/p2ptls/autotls/storage/postgres"
)

const (
	// childEnv carries a child's job (childJob, as JSON).
	childEnv = "AUTOTLS_TEST_CHILD_JOB"
	// childPrefix starts the child's report lines on its standard output,
	// among the test framework's own.
	childPrefix = "autotls-child: "
)

// childJob is what a child process does, and with what.
type childJob struct {
	// Run is the child's program: "budget" (childBudget), "serve"
	// (childServe) or "fleet" (childFleet).
	Run string
	// The forge, and its CA behind a proxy.
	Domain, BrokerURL, CAURL, DNSAddr string
	CARootPEM, IssuerRootPEM          []byte
	// Keys are the identities of the child's hosts, marshaled.
	Keys [][]byte
	// Storage: the directory of a storage.Dir, or else a PostgreSQL
	// database, its schema and lease.
	Dir                 string
	PostgresURL, Schema string
	Lease               time.Duration
	// Parallel bounds the hosts a fleet child runs at once.
	Parallel int
}

// childReport is one line of a child's report.
type childReport struct {
	// Event: "cert" (a host serves a certificate), "refused" (a host was
	// held back by the issuance budget), "done" (the child is finished).
	Event  string
	Peer   string     `json:",omitempty"`
	Source CertSource `json:",omitempty"`
	Serial string     `json:",omitempty"` // of the certificate a TLS handshake got
	Addr   string     `json:",omitempty"` // the host's WSS listener, host:port
	Err    string     `json:",omitempty"`
}

// newChildJob returns a job of program run against f, with its CA reached
// through ca, or directly if ca is nil (no proxy hop, and no request log:
// f.Stats counts the CA's requests).
func newChildJob(t *testing.T, f *testforge.Forge, ca *testforge.CAProxy, run string, keys ...crypto.PrivKey) childJob {
	t.Helper()
	j := childJob{Run: run, Domain: f.Domain, BrokerURL: f.BrokerURL, DNSAddr: f.DNSAddr, IssuerRootPEM: f.IssuerRootPEM}
	if ca != nil {
		j.CAURL, j.CARootPEM = ca.URL, ca.RootPEM
	} else {
		j.CAURL, j.CARootPEM = f.CAURL, caCertPEM(t, f)
	}
	for _, k := range keys {
		raw, err := crypto.MarshalPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		j.Keys = append(j.Keys, raw)
	}
	return j
}

// caCertPEM returns the certificate of the forge's ACME endpoint, which
// f.CARoots trusts, for a child process to trust.
func caCertPEM(t *testing.T, f *testforge.Forge) []byte {
	t.Helper()
	u, err := url.Parse(f.CAURL)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := tls.Dial("tcp", u.Host, &tls.Config{RootCAs: f.CARoots})
	if err != nil {
		t.Fatalf("reading the ACME endpoint's certificate: %v", err)
	}
	defer conn.Close()
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: conn.ConnectionState().PeerCertificates[0].Raw})
}

// child is a running child process.
type child struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	reports chan childReport // closed when its standard output closes
	mu      sync.Mutex
	out     bytes.Buffer // everything else it wrote
	exited  chan struct{}
	err     error // of Wait, once exited is closed
}

// startChild starts a child process with job. It is killed at cleanup if
// it is still running.
func startChild(t *testing.T, job childJob) *child {
	t.Helper()
	raw, err := json.Marshal(job)
	if err != nil {
		t.Fatal(err)
	}
	c := &child{reports: make(chan childReport, 1024), exited: make(chan struct{})}
	c.cmd = exec.Command(os.Args[0], "-test.run=^TestChildProcess$", "-test.count=1", "-test.v")
	c.cmd.Env = append(os.Environ(), childEnv+"="+string(raw))
	c.cmd.Stderr = (*lockedWriter)(c)
	if c.stdin, err = c.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	read := make(chan struct{})
	go func() {
		defer close(read)
		defer close(c.reports)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if rest, ok := strings.CutPrefix(line, childPrefix); ok {
				var r childReport
				if err := json.Unmarshal([]byte(rest), &r); err == nil {
					c.reports <- r
					continue
				}
			}
			fmt.Fprintln((*lockedWriter)(c), line)
		}
	}()
	go func() {
		<-read // Wait closes the pipe: read it all first
		c.err = c.cmd.Wait()
		close(c.exited)
	}()
	t.Cleanup(func() {
		_ = c.cmd.Process.Kill()
		<-c.exited
	})
	return c
}

// lockedWriter is a child's output buffer, written from two goroutines.
type lockedWriter child

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.out.Write(p)
}

// output returns what the child wrote apart from its reports.
func (c *child) output() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.String()
}

// next returns the child's next report, failing the test after timeout
// or if the child ends first.
func (c *child) next(t *testing.T, timeout time.Duration) childReport {
	t.Helper()
	select {
	case r, ok := <-c.reports:
		if !ok {
			<-c.exited
			t.Fatalf("the child ended (%v) without reporting; its output:\n%s", c.err, c.output())
		}
		if r.Err != "" {
			t.Fatalf("the child failed: %s; its output:\n%s", r.Err, c.output())
		}
		return r
	case <-time.After(timeout):
		t.Fatalf("no report from the child within %v; its output:\n%s", timeout, c.output())
	}
	return childReport{}
}

// untilDone closes the child's standard input, which tells it to finish
// (a "serve" child closes its host), and returns its reports up to its
// "done", and waits for it to exit.
func (c *child) untilDone(t *testing.T, timeout time.Duration) []childReport {
	t.Helper()
	_ = c.stdin.Close()
	deadline := time.Now().Add(timeout)
	var out []childReport
	for {
		r := c.next(t, time.Until(deadline))
		if r.Event == "done" {
			c.stop(t)
			return out
		}
		out = append(out, r)
	}
}

// stop waits for the child to exit, which it does once its standard
// input is closed.
func (c *child) stop(t *testing.T) {
	t.Helper()
	_ = c.stdin.Close()
	select {
	case <-c.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("the child did not exit within 30 s; its output:\n%s", c.output())
	}
	if c.err != nil {
		t.Errorf("the child exited with %v; its output:\n%s", c.err, c.output())
	}
}

// kill kills the child (SIGKILL) and waits for it.
func (c *child) kill(t *testing.T) {
	t.Helper()
	if err := c.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-c.exited
}

// ---- The child's side ----

// TestChildProcess is a child process of a multi-process test: it is
// skipped unless started by startChild.
func TestChildProcess(t *testing.T) {
	raw := os.Getenv(childEnv)
	if raw == "" {
		t.Skip("a process that the multi-process tests start")
	}
	var job childJob
	if err := json.Unmarshal([]byte(raw), &job); err != nil {
		t.Fatal(err)
	}
	w := &childWriter{}
	defer func() {
		if t.Failed() {
			w.report(childReport{Event: "failed", Err: "see the output"})
		}
	}()
	st := job.storage(t)
	switch job.Run {
	case "budget":
		childBudget(t, job, st, w)
	case "serve":
		childServe(t, job, st, w)
	case "fleet":
		childFleet(t, job, st, w)
	default:
		t.Fatalf("unknown child program %q", job.Run)
	}
	w.report(childReport{Event: "done"})
	// The parent closes the standard input when it has read everything.
	_, _ = io.Copy(io.Discard, os.Stdin)
}

// childWriter writes a child's reports, one line each.
type childWriter struct{ mu sync.Mutex }

func (w *childWriter) report(r childReport) {
	raw, _ := json.Marshal(r)
	w.mu.Lock()
	defer w.mu.Unlock()
	fmt.Fprintf(os.Stdout, "%s%s\n", childPrefix, raw)
}

// storage opens the job's storage, closed at cleanup.
func (j childJob) storage(t *testing.T) certmagic.Storage {
	t.Helper()
	if j.Dir != "" {
		st, err := storage.Dir(j.Dir)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	st, err := postgres.New(ctx, j.PostgresURL, postgres.WithSchema(j.Schema), postgres.WithLease(j.Lease),
		postgres.WithLogger(j.logger()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	return st
}

// logger logs at info level to the standard error, which the parent
// shows if the test fails.
func (j childJob) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// key returns the job's n-th identity.
func (j childJob) key(t *testing.T, n int) crypto.PrivKey {
	t.Helper()
	k, err := crypto.UnmarshalPrivateKey(j.Keys[n])
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// newHost starts a loopback host with identity key, pointed at the forge,
// storing in st.
func (j childJob) newHost(key crypto.PrivKey, st certmagic.Storage, extra ...libp2p.Option) (host.Host, error) {
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(j.CARootPEM)
	resolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, j.DNSAddr)
	}}
	opts := append([]libp2p.Option{
		libp2p.Identity(key),
		// TCP only (and the WebSocket transport autotls adds), Noise only,
		// no relay or metrics: what else go-libp2p sets up by default costs
		// each host keys, certificates and goroutines that these tests,
		// which start hundreds of hosts, never use.
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.Security(noise.ID, noise.New),
		libp2p.DisableRelay(),
		libp2p.DisableMetrics(),
		libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"),
		libp2p.ConnectionGater(testforge.LoopbackGater()),
		Option(WithForgeDomain(j.Domain), WithRegistrationEndpoint(j.BrokerURL), WithCA(j.CAURL, roots),
			WithAllowPrivateAddrs(), WithResolver(resolver), WithStorage(st), WithLogger(j.logger())),
	}, extra...)
	return libp2p.New(opts...)
}

// serving waits for h's certificate and returns its report: where its
// WSS listener is, and the serial a TLS handshake there gets.
func (j childJob) serving(h host.Host, timeout time.Duration) (childReport, error) {
	sub, err := h.EventBus().Subscribe(new(EvtCertificateLoaded))
	if err != nil {
		return childReport{}, err
	}
	defer sub.Close()
	var ev EvtCertificateLoaded
	select {
	case e := <-sub.Out():
		ev = e.(EvtCertificateLoaded)
	case <-time.After(timeout):
		return childReport{}, fmt.Errorf("%s: no certificate within %v", h.ID(), timeout)
	}
	r := childReport{Event: "cert", Peer: h.ID().String(), Source: ev.Source}
	r.Addr, r.Serial, err = j.handshake(h)
	return r, err
}

// handshake makes a TLS handshake with h's WSS listener, verifying the
// chain to the forge's issuing root, and returns the listener's address
// and the serial of the certificate it presented.
func (j childJob) handshake(h host.Host) (addr, serial string, err error) {
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(j.IssuerRootPEM)
	sni := "127-0-0-1." + testforge.PeerLabel(h.ID()) + "." + j.Domain
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		for _, a := range h.Network().ListenAddresses() {
			if !isForgeListenAddr(a, j.Domain) {
				continue
			}
			ip, _ := a.ValueForProtocol(ma.P_IP4)
			port, _ := a.ValueForProtocol(ma.P_TCP)
			addr = net.JoinHostPort(ip, port)
			st, err := tlsHandshake(addr, sni, roots)
			if err != nil {
				return "", "", fmt.Errorf("TLS handshake with %s: %w", addr, err)
			}
			return addr, st.PeerCertificates[0].SerialNumber.Text(16), nil
		}
	}
	return "", "", errors.New("no WSS listener")
}
