package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/caddyserver/certmagic"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/internal/layout"
	"github.com/p2ptls/autotls/storage"
)

// doctor is what the doctor checks, beyond the target.
type doctor struct {
	target
	endpoint     string
	caRoot       string
	dnsServer    string
	addrs        []ma.Multiaddr
	allowPrivate bool
	timeout      time.Duration

	caClient     *http.Client // trusts -ca-root, or the system roots
	brokerClient *http.Client
	resolver     *net.Resolver
}

// userAgent is sent to the broker and the CA.
const userAgent = "github.com/p2ptls/autotls/cmd/autotls"

func runDoctor(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fset := flag.NewFlagSet("doctor", flag.ContinueOnError)
	var d doctor
	d.flags(fset)
	fset.StringVar(&d.endpoint, "endpoint", "", "the broker's base URL (WithRegistrationEndpoint; default "+autotls.DefaultRegistrationEndpoint+" with the default forge)")
	fset.StringVar(&d.caRoot, "ca-root", "", "a PEM file with the roots that verify the CA's HTTPS endpoint (default: the system roots)")
	fset.StringVar(&d.dnsServer, "dns", "", "a DNS server, host:port, to resolve the forge's names through (default: the system resolver)")
	fset.Func("addr", "a TCP address of the host, as a multiaddr such as /ip4/203.0.113.7/tcp/4001 (repeatable)", func(s string) error {
		a, err := ma.NewMultiaddr(s)
		if err != nil {
			return err
		}
		d.addrs = append(d.addrs, a)
		return nil
	})
	fset.BoolVar(&d.allowPrivate, "allow-private", false, "private and loopback addresses are fine (the host runs WithAllowPrivateAddrs)")
	fset.DurationVar(&d.timeout, "timeout", 10*time.Second, "how long each network check may take")
	if code := parse(fset, &d.target, args, "Checks what the host needs, one line each: storage, the stored certificate,\nthe broker, the forge's DNS, the CA, the host's addresses. Exits 1 when a\ncheck fails.", stderr); code >= 0 {
		return code
	}
	if err := d.setup(); err != nil {
		fmt.Fprintf(stderr, "autotls doctor: %v\n", err)
		return 2
	}
	defer d.caClient.CloseIdleConnections()
	defer d.brokerClient.CloseIdleConnections()
	failed := false
	d.run(ctx, func(c check) {
		failed = failed || c.status == statusFail
		fmt.Fprintf(stdout, "%-4s %-12s %s\n", c.status, c.name, c.text)
	})
	if failed {
		return 1
	}
	return 0
}

// setup checks the doctor's own flags and builds its clients.
func (d *doctor) setup() error {
	if d.endpoint == "" {
		if d.forge != autotls.DefaultForgeDomain {
			return fmt.Errorf("-endpoint is required with -forge %s", d.forge)
		}
		d.endpoint = autotls.DefaultRegistrationEndpoint
	}
	if u, err := url.Parse(d.endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("-endpoint %q: want an absolute http or https URL", d.endpoint)
	}
	d.endpoint = strings.TrimRight(d.endpoint, "/")
	if d.timeout <= 0 {
		return errors.New("-timeout must be positive")
	}
	var roots *x509.CertPool
	if d.caRoot != "" {
		pemBytes, err := os.ReadFile(d.caRoot)
		if err != nil {
			return fmt.Errorf("reading -ca-root: %v", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pemBytes) {
			return fmt.Errorf("-ca-root %s holds no PEM certificate", d.caRoot)
		}
	}
	d.caClient = newClient(roots, d.timeout)
	d.brokerClient = newClient(nil, d.timeout)
	d.resolver = net.DefaultResolver
	if d.dnsServer != "" {
		if _, _, err := net.SplitHostPort(d.dnsServer); err != nil {
			return fmt.Errorf("-dns %q: want host:port, such as 127.0.0.1:53", d.dnsServer)
		}
		server := d.dnsServer
		d.resolver = &net.Resolver{
			PreferGo: true,
			Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
				var nd net.Dialer
				return nd.DialContext(ctx, network, server)
			},
		}
	}
	return nil
}

func newClient(roots *x509.CertPool, timeout time.Duration) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: roots}
	return &http.Client{Transport: tr, Timeout: timeout}
}

// check is one line of the doctor's report.
type check struct {
	status string // statusOK, statusFail or statusSkip
	name   string
	text   string
}

const (
	statusOK   = "ok"
	statusFail = "FAIL"
	statusSkip = "--"
)

func ok(name, format string, args ...any) check {
	return check{statusOK, name, fmt.Sprintf(format, args...)}
}

func fail(name, format string, args ...any) check {
	return check{statusFail, name, fmt.Sprintf(format, args...)}
}

// run runs every check in turn and reports each.
func (d *doctor) run(ctx context.Context, report func(check)) {
	st, c := d.checkStorage(ctx)
	report(c)
	if st != nil {
		report(d.checkCertificate(ctx, st))
	}
	report(d.checkBroker(ctx))
	for _, c := range d.checkDNS(ctx) {
		report(c)
	}
	report(d.checkCA(ctx))
	for _, c := range d.checkAddrs() {
		report(c)
	}
}

// checkStorage stores, reads back and deletes a probe, and takes and
// releases a lock, as the host does when it keeps a certificate.
func (d *doctor) checkStorage(ctx context.Context) (certmagic.Storage, check) {
	const name = "storage"
	st, err := storage.Dir(d.dir)
	if err != nil {
		return nil, fail(name, "%s cannot be used (%s); pass -storage, or make it a directory this user can write", d.dir, describe(err))
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	probe := "autotls/doctor-" + hex.EncodeToString(b[:]) + ".probe"
	notWritable := func(err error) (certmagic.Storage, check) {
		return st, fail(name, "%s is not writable (%s); make it writable by the user the host runs as: the host keeps its certificate, key and ACME account there", d.dir, describe(err))
	}
	if err := st.Store(ctx, probe, b[:]); err != nil {
		return notWritable(err)
	}
	got, err := st.Load(ctx, probe)
	if err != nil {
		return st, fail(name, "%s does not read back what was stored (%s); check the disk", d.dir, describe(err))
	}
	if !bytes.Equal(got, b[:]) {
		return st, fail(name, "%s reads back something else than was stored; check the disk", d.dir)
	}
	if err := st.Delete(ctx, probe); err != nil {
		return notWritable(err)
	}
	lctx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	if err := st.Lock(lctx, "autotls_doctor"); err != nil {
		return st, fail(name, "%s cannot be locked (%s); the host locks it to issue a certificate", d.dir, describe(err))
	}
	if err := st.Unlock(ctx, "autotls_doctor"); err != nil {
		return st, fail(name, "%s cannot be unlocked (%s)", d.dir, describe(err))
	}
	return st, ok(name, "%s is readable and writable", d.dir)
}

// checkCertificate reports the stored certificate as status does; only a
// missing one (not yet requested) or a valid one passes.
func (d *doctor) checkCertificate(ctx context.Context, st certmagic.Storage) check {
	now := time.Now()
	c := inspectCert(ctx, st, &d.target, now)
	if c.valid || c.none {
		return ok("certificate", "%s", c.text)
	}
	return fail("certificate", "%s", c.text)
}

// checkBroker asks the broker's health endpoint, as the host does before
// its first certificate request.
func (d *doctor) checkBroker(ctx context.Context) check {
	const name = "broker"
	u := d.endpoint + "/v1/health"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fail(name, "%s: %v; check -endpoint", u, err)
	}
	req.Header.Set("User-Agent", userAgent)
	resp, err := d.brokerClient.Do(req)
	if err != nil {
		return fail(name, "%s is unreachable (%s); check the network and -endpoint; the host waits for the broker before its first request", u, describe(err))
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		return fail(name, "%s answers %s, not 204 No Content; the host waits until it does, or check -endpoint", u, resp.Status)
	}
	return ok(name, "%s answers 204", u)
}

// checkDNS asks the forge's DNS for the host's challenge record, which the
// CA looks up, and for the name of each of the host's IP addresses, which
// browsers look up.
func (d *doctor) checkDNS(ctx context.Context) []check {
	const name = "dns"
	server := "the system resolver"
	if d.dnsServer != "" {
		server = d.dnsServer
	}
	var out []check
	ctx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	txt := "_acme-challenge." + layout.PeerLabel(d.id) + "." + d.forge
	if vals, err := d.resolver.LookupTXT(ctx, txt); err != nil {
		out = append(out, fail(name, "%s does not resolve through %s (%s); the CA cannot validate a challenge: check -forge and -dns", txt, server, describeDNS(err, d.timeout)))
	} else {
		out = append(out, ok(name, "%s answers through %s (TXT %q)", txt, server, strings.Join(vals, "")))
	}
	for _, a := range d.addrs {
		ip, err := addrIP(a)
		if err != nil {
			continue // reported by checkAddrs
		}
		label, err := layout.IPLabel(ip)
		if err != nil {
			continue
		}
		host := label + "." + layout.PeerLabel(d.id) + "." + d.forge
		network := "ip4"
		if ip.Is6() {
			network = "ip6"
		}
		got, err := d.resolver.LookupNetIP(ctx, network, host)
		if err != nil {
			out = append(out, fail(name, "%s does not resolve through %s (%s); browsers cannot find the host at %s", host, server, describeDNS(err, d.timeout), ip))
			continue
		}
		found := false
		for _, g := range got {
			found = found || g.Unmap() == ip
		}
		if !found {
			out = append(out, fail(name, "%s resolves to %v through %s, not %s; check -forge and -dns", host, got, server, ip))
			continue
		}
		out = append(out, ok(name, "%s resolves to %s through %s", host, ip, server))
	}
	return out
}

// checkCA fetches the CA's ACME directory.
func (d *doctor) checkCA(ctx context.Context) check {
	const name = "ca"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.caURL, nil)
	if err != nil {
		return fail(name, "%s: %v; check -ca", d.caURL, err)
	}
	req.Header.Set("User-Agent", userAgent)
	resp, err := d.caClient.Do(req)
	if err != nil {
		var unknown x509.UnknownAuthorityError
		if errors.As(err, &unknown) {
			return fail(name, "%s presents a certificate no trusted root signed; pass the CA's root with -ca-root, or look for a proxy intercepting TLS", d.caURL)
		}
		return fail(name, "%s is unreachable (%s); the host can neither get nor renew a certificate until it is: check the network, a firewall or proxy, and -ca", d.caURL, describe(err))
	}
	defer resp.Body.Close()
	var dir struct {
		NewNonce   string `json:"newNonce"`
		NewAccount string `json:"newAccount"`
		NewOrder   string `json:"newOrder"`
	}
	if resp.StatusCode != http.StatusOK {
		return fail(name, "%s answers %s, not an ACME directory; check -ca", d.caURL, resp.Status)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&dir); err != nil || dir.NewNonce == "" || dir.NewAccount == "" || dir.NewOrder == "" {
		return fail(name, "%s answers something that is not an ACME directory; check -ca", d.caURL)
	}
	return ok(name, "%s is an ACME directory", d.caURL)
}

// checkAddrs says of each of the host's addresses whether the broker can
// be given it: a TCP address, public unless private ones are allowed.
func (d *doctor) checkAddrs() []check {
	const name = "address"
	if len(d.addrs) == 0 {
		return []check{{statusSkip, name, "none given (-addr); the host learns its public TCP addresses from AutoNAT"}}
	}
	var out []check
	for _, a := range d.addrs {
		ip, err := addrIP(a)
		switch {
		case err != nil:
			out = append(out, fail(name, "%s: %v", a, err))
		case manet.IsPublicAddr(a) && !manet.IsNAT64IPv4ConvertedIPv6Addr(a):
			out = append(out, ok(name, "%s is public", a))
		case d.allowPrivate:
			out = append(out, ok(name, "%s is not public; fine with -allow-private (WithAllowPrivateAddrs)", a))
		default:
			out = append(out, fail(name, "%s is not public (%s): the broker cannot dial it back; forward a public TCP port to the host or enable UPnP, or run your own forge with WithAllowPrivateAddrs", a, ip))
		}
	}
	return out
}

// addrIP returns the IP of an /ip4 or /ip6 address with a TCP port.
func addrIP(a ma.Multiaddr) (netip.Addr, error) {
	if _, err := a.ValueForProtocol(ma.P_TCP); err != nil {
		return netip.Addr{}, errors.New("not a TCP address: the broker dials the host back over TCP")
	}
	if _, err := a.ValueForProtocol(ma.P_CIRCUIT); err == nil {
		return netip.Addr{}, errors.New("a relay address: the broker needs a direct TCP address")
	}
	nip, err := manet.ToIP(a)
	if err != nil {
		return netip.Addr{}, errors.New("no IP address: give /ip4/<ip>/tcp/<port> or /ip6/<ip>/tcp/<port>")
	}
	ip, _ := netip.AddrFromSlice(nip)
	return ip.Unmap(), nil
}

// describe says what went wrong in a few words, for the common causes.
func describe(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, fs.ErrPermission):
		return "permission denied"
	case errors.Is(err, syscall.EROFS):
		return "read-only file system"
	case errors.Is(err, syscall.ENOSPC):
		return "no space left on the device"
	case errors.Is(err, syscall.ENOTDIR):
		return "a file stands where a directory should"
	case errors.As(err, &ne) && ne.Timeout():
		return "no answer in time"
	}
	return err.Error()
}

// describeDNS says why a lookup failed.
func describeDNS(err error, timeout time.Duration) string {
	var de *net.DNSError
	if errors.As(err, &de) {
		switch {
		case errors.Is(err, syscall.ECONNREFUSED), strings.HasSuffix(de.Err, syscall.ECONNREFUSED.Error()):
			// The resolver keeps only the text of a read's error.
			return "connection refused: no DNS server there"
		case de.IsNotFound:
			return "no such name"
		case de.IsTimeout:
			return fmt.Sprintf("no answer within %v", timeout)
		}
		return de.Err
	}
	return describe(err)
}
