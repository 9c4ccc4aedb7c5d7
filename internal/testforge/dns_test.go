package testforge

import (
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func TestPeerLabelSpecVector(t *testing.T) {
	_, id := seededKey(t, 2)
	const want = "k51qzi5uqu5djejcj9das04p3wen7mowcz0z5iq3tw0yxaa8ko01odjley7fdg"
	if got := PeerLabel(id); got != want {
		t.Fatalf("PeerLabel(%s) = %s, want %s", id, got, want)
	}
}

func TestDNSAnswers(t *testing.T) {
	f := startForge(t, Config{})
	_, stored := seededKey(t, 2)
	_, unset := seededKey(t, 3)
	value := digest("stored")
	f.SetTXT(stored, value)
	p, u := PeerLabel(stored), PeerLabel(unset)

	type want struct {
		rcode  int
		answer string // "" for none; else the answer's rdata in presentation form
		ttl    uint32
		soa    bool // SOA in the authority section
	}
	nodata := want{rcode: dns.RcodeSuccess, soa: true}
	nxdomain := want{rcode: dns.RcodeNameError, soa: true}
	tests := []struct {
		name  string
		qname string
		qtype uint16
		want  want
	}{
		{"txt stored", "_acme-challenge." + p + ".libp2p.direct.", dns.TypeTXT, want{answer: `"` + value + `"`, ttl: 10}},
		{"txt not set", "_acme-challenge." + u + ".libp2p.direct.", dns.TypeTXT, want{answer: `"not set yet"`, ttl: 10}},
		{"acme name other type", "_acme-challenge." + p + ".libp2p.direct.", dns.TypeA, want{}},
		{"a", "1-2-3-4." + p + ".libp2p.direct.", dns.TypeA, want{answer: "1.2.3.4", ttl: 604800}},
		{"a unregistered peer", "203-0-113-7." + u + ".libp2p.direct.", dns.TypeA, want{answer: "203.0.113.7", ttl: 604800}},
		{"aaaa compressed", "2001-db8--1." + p + ".libp2p.direct.", dns.TypeAAAA, want{answer: "2001:db8::1", ttl: 604800}},
		{"aaaa expanded", "2001-db8-0-0-0-0-0-1." + p + ".libp2p.direct.", dns.TypeAAAA, want{answer: "2001:db8::1", ttl: 604800}},
		{"aaaa loopback padded", "0--1." + p + ".libp2p.direct.", dns.TypeAAAA, want{answer: "::1", ttl: 604800}},
		{"aaaa trailing padded", "2001-db8--0." + p + ".libp2p.direct.", dns.TypeAAAA, want{answer: "2001:db8::", ttl: 604800}},
		{"case insensitive", "1-2-3-4." + strings.ToUpper(p) + ".LIBP2P.Direct.", dns.TypeA, want{answer: "1.2.3.4", ttl: 604800}},
		{"v4 label as aaaa", "1-2-3-4." + p + ".libp2p.direct.", dns.TypeAAAA, nodata},
		{"v6 label as a", "2001-db8--1." + p + ".libp2p.direct.", dns.TypeA, nodata},
		{"ip label txt", "1-2-3-4." + p + ".libp2p.direct.", dns.TypeTXT, nodata},
		{"ip label mx", "1-2-3-4." + p + ".libp2p.direct.", dns.TypeMX, nodata},
		{"bad label", "foo." + p + ".libp2p.direct.", dns.TypeA, nodata},
		{"leading zero", "01-2-3-4." + p + ".libp2p.direct.", dns.TypeA, nodata},
		{"three octets", "1-2-3." + p + ".libp2p.direct.", dns.TypeA, nodata},
		{"octet too big", "256-1-1-1." + p + ".libp2p.direct.", dns.TypeA, nodata},
		{"bad v6", "2001-db8---1." + p + ".libp2p.direct.", dns.TypeAAAA, nodata},
		{"bare peer a", p + ".libp2p.direct.", dns.TypeA, nodata},
		{"bare peer txt", p + ".libp2p.direct.", dns.TypeTXT, nodata},
		{"deeper", "a.1-2-3-4." + p + ".libp2p.direct.", dns.TypeA, nxdomain},
		{"deeper acme", "x._acme-challenge." + p + ".libp2p.direct.", dns.TypeTXT, nxdomain},
		{"not a peer", "1-2-3-4.notapeer.libp2p.direct.", dns.TypeA, nxdomain},
		{"base58 lower-cased", "1-2-3-4.12d3koowjwoaqzhdaoefshf7rh1bpy9ohihfhzcw6d69lr2nasuq.libp2p.direct.", dns.TypeA, nxdomain},
		{"acme not a peer", "_acme-challenge.notapeer.libp2p.direct.", dns.TypeTXT, nxdomain},
		{"apex soa", "libp2p.direct.", dns.TypeSOA, want{answer: "ns1.libp2p.direct. hostmaster.libp2p.direct. 1 86400 2400 604800 86400", ttl: 86400}},
		{"apex a", "libp2p.direct.", dns.TypeA, nodata},
		{"outside", "example.com.", dns.TypeA, want{rcode: dns.RcodeRefused}},
		{"suffix lookalike", "1-2-3-4." + p + ".notlibp2p.direct.", dns.TypeA, want{rcode: dns.RcodeRefused}},
	}
	for _, network := range []string{"udp", "tcp"} {
		client := &dns.Client{Net: network, Timeout: 5 * time.Second}
		for _, tt := range tests {
			t.Run(network+"/"+tt.name, func(t *testing.T) {
				q := new(dns.Msg)
				q.SetQuestion(tt.qname, tt.qtype)
				q.RecursionDesired = true
				r, _, err := client.ExchangeContext(t.Context(), q, f.DNSAddr)
				if err != nil {
					t.Fatalf("exchange: %v", err)
				}
				if r.Rcode != tt.want.rcode {
					t.Fatalf("rcode = %s, want %s", dns.RcodeToString[r.Rcode], dns.RcodeToString[tt.want.rcode])
				}
				if wantAA := tt.want.rcode != dns.RcodeRefused; r.Authoritative != wantAA {
					t.Errorf("AA = %v, want %v", r.Authoritative, wantAA)
				}
				if tt.want.answer == "" {
					if len(r.Answer) != 0 {
						t.Errorf("answer = %v, want none", r.Answer)
					}
				} else {
					if len(r.Answer) != 1 {
						t.Fatalf("answer = %v, want one record", r.Answer)
					}
					rr := r.Answer[0]
					if got := strings.TrimPrefix(rr.String(), rr.Header().String()); got != tt.want.answer {
						t.Errorf("answer rdata = %q, want %q", got, tt.want.answer)
					}
					if rr.Header().Ttl != tt.want.ttl {
						t.Errorf("TTL = %d, want %d", rr.Header().Ttl, tt.want.ttl)
					}
					if rr.Header().Rrtype != tt.qtype {
						t.Errorf("answer type = %s, want %s", dns.TypeToString[rr.Header().Rrtype], dns.TypeToString[tt.qtype])
					}
				}
				gotSOA := len(r.Ns) == 1 && r.Ns[0].Header().Rrtype == dns.TypeSOA
				if gotSOA != tt.want.soa || (!tt.want.soa && len(r.Ns) != 0) {
					t.Errorf("authority = %v, want SOA: %v", r.Ns, tt.want.soa)
				}
			})
		}
	}
}

func TestDNSCustomDomain(t *testing.T) {
	f := startForge(t, Config{Domain: " Forge.Example. "})
	if f.Domain != "forge.example" {
		t.Fatalf("Domain = %q, want forge.example", f.Domain)
	}
	_, id := seededKey(t, 2)
	ips, err := f.Resolver().LookupIPAddr(t.Context(), "127-0-0-1."+PeerLabel(id)+".forge.example")
	if err != nil || len(ips) != 1 || !ips[0].IP.Equal(net.IPv4(127, 0, 0, 1)) {
		t.Fatalf("LookupIPAddr = %v, %v; want 127.0.0.1", ips, err)
	}
	if _, err := f.Resolver().LookupIPAddr(t.Context(), "127-0-0-1."+PeerLabel(id)+".libp2p.direct"); err == nil {
		t.Fatal("a forge for forge.example answered for libp2p.direct")
	}
	if _, err := Start(Config{Domain: "bad..domain"}); err == nil {
		t.Fatal("Start accepted an invalid domain")
	}
}

func TestResolver(t *testing.T) {
	f := startForge(t, Config{})
	_, id := seededKey(t, 2)
	value := digest("resolver")
	f.SetTXT(id, value)
	base := PeerLabel(id) + ".libp2p.direct"
	r := f.Resolver()

	txts, err := r.LookupTXT(t.Context(), "_acme-challenge."+base)
	if err != nil || !slices.Equal(txts, []string{value}) {
		t.Fatalf("LookupTXT = %v, %v; want [%s]", txts, err, value)
	}
	ips, err := r.LookupIPAddr(t.Context(), "0--1."+base)
	if err != nil || len(ips) != 1 || !ips[0].IP.Equal(net.IPv6loopback) {
		t.Fatalf("LookupIPAddr = %v, %v; want ::1", ips, err)
	}
	_, err = r.LookupIPAddr(t.Context(), "a.b."+base)
	var dnsErr *net.DNSError
	if !errors.As(err, &dnsErr) || !dnsErr.IsNotFound {
		t.Fatalf("LookupIPAddr(deeper name) error = %v, want not found", err)
	}
	if got := f.Stats().DNSTXT; got < 1 {
		t.Errorf("Stats().DNSTXT = %d, want at least 1", got)
	}
}

func TestDNSFault(t *testing.T) {
	f := startForge(t, Config{})
	_, id := seededKey(t, 2)
	f.SetTXT(id, digest("fault"))
	txtName := "_acme-challenge." + PeerLabel(id) + ".libp2p.direct."
	aName := "1-2-3-4." + PeerLabel(id) + ".libp2p.direct."
	query := func(t *testing.T, name string, qtype uint16, timeout time.Duration) (*dns.Msg, error) {
		t.Helper()
		q := new(dns.Msg)
		q.SetQuestion(name, qtype)
		c := &dns.Client{Net: "udp", Timeout: timeout}
		r, _, err := c.ExchangeContext(t.Context(), q, f.DNSAddr)
		return r, err
	}

	t.Run("hide txt", func(t *testing.T) {
		f.SetDNSFault(func(dns.Question) DNSFault { return DNSFault{HideTXT: true} })
		t.Cleanup(func() { f.SetDNSFault(nil) })
		r, err := query(t, txtName, dns.TypeTXT, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.Answer) != 1 || r.Answer[0].(*dns.TXT).Txt[0] != notSetYet {
			t.Fatalf("answer = %v, want %q", r.Answer, notSetYet)
		}
		if _, ok := f.TXT(id); !ok {
			t.Fatal("HideTXT removed the stored value")
		}
	})

	t.Run("drop only TXT", func(t *testing.T) {
		f.SetDNSFault(func(q dns.Question) DNSFault { return DNSFault{Drop: q.Qtype == dns.TypeTXT} })
		t.Cleanup(func() { f.SetDNSFault(nil) })
		if _, err := query(t, txtName, dns.TypeTXT, 200*time.Millisecond); err == nil {
			t.Fatal("got an answer to a dropped query")
		}
		if _, err := query(t, aName, dns.TypeA, 5*time.Second); err != nil {
			t.Fatalf("A query failed while only TXT is dropped: %v", err)
		}
	})

	t.Run("delay", func(t *testing.T) {
		const delay = 100 * time.Millisecond
		f.SetDNSFault(func(dns.Question) DNSFault { return DNSFault{Delay: delay} })
		t.Cleanup(func() { f.SetDNSFault(nil) })
		start := time.Now()
		if _, err := query(t, aName, dns.TypeA, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		if elapsed := time.Since(start); elapsed < delay {
			t.Fatalf("answered after %v, before the %v delay", elapsed, delay)
		}
	})
}

// A query held by a long Delay must not hold up Close.
func TestDNSDelayDoesNotBlockClose(t *testing.T) {
	f := New(t, Config{})
	f.SetDNSFault(func(dns.Question) DNSFault { return DNSFault{Delay: time.Hour} })
	q := new(dns.Msg)
	q.SetQuestion("libp2p.direct.", dns.TypeSOA)
	go func() {
		c := &dns.Client{Net: "tcp", Timeout: time.Minute}
		_, _, _ = c.ExchangeContext(context.Background(), q, f.DNSAddr)
	}()
	for f.Stats().DNS == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	closed := make(chan error)
	go func() { closed <- f.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close blocked behind a delayed DNS query")
	}
}
