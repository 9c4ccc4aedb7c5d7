package testforge

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/miekg/dns"
)

// TTLs and SOA timers, as served by the production forge (protocol §2.7).
const (
	ttlTXT     = 10
	ttlIP      = 604800
	ttlSOA     = 86400
	notSetYet  = "not set yet"
	acmePrefix = "_acme-challenge"
)

// dnsServer serves the forge zone on one port, UDP and TCP.
type dnsServer struct {
	addr string
	udp  *dns.Server
	tcp  *dns.Server
}

func startDNS(f *Forge) (*dnsServer, error) {
	pc, ln, err := listenDNS(f.cfg.listenIP())
	if err != nil {
		return nil, err
	}
	handler := dns.HandlerFunc(f.serveDNS)
	s := &dnsServer{
		addr: pc.LocalAddr().String(),
		udp:  &dns.Server{PacketConn: pc, Handler: handler},
		tcp:  &dns.Server{Listener: ln, Handler: handler},
	}
	// ActivateAndServe marks a server started before NotifyStartedFunc;
	// waiting for both makes Shutdown in close always valid.
	started := make(chan struct{}, 2)
	errc := make(chan error, 2)
	for _, srv := range []*dns.Server{s.udp, s.tcp} {
		srv.NotifyStartedFunc = func() { started <- struct{}{} }
		go func() { errc <- srv.ActivateAndServe() }()
	}
	for range 2 {
		select {
		case <-started:
		case err := <-errc:
			_ = pc.Close()
			_ = ln.Close()
			return nil, err
		}
	}
	return s, nil
}

// listenDNS binds UDP and TCP to the same free port on ip.
func listenDNS(ip netip.Addr) (net.PacketConn, net.Listener, error) {
	var lastErr error
	for range 20 {
		pc, err := net.ListenPacket("udp", netip.AddrPortFrom(ip, 0).String())
		if err != nil {
			return nil, nil, err
		}
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			return pc, ln, nil
		}
		lastErr = err
		_ = pc.Close()
	}
	return nil, nil, fmt.Errorf("no port free for both UDP and TCP: %w", lastErr)
}

func (s *dnsServer) close() error {
	return errors.Join(s.udp.Shutdown(), s.tcp.Shutdown())
}

// serveDNS answers one query, applying the fault hook if one is set.
func (f *Forge) serveDNS(w dns.ResponseWriter, req *dns.Msg) {
	f.stats.dns.Add(1)
	var q dns.Question
	if len(req.Question) > 0 {
		q = req.Question[0]
		if q.Qtype == dns.TypeTXT && strings.HasPrefix(strings.ToLower(q.Name), acmePrefix+".") {
			f.stats.dnsTXT.Add(1)
		}
	}

	var fault DNSFault
	if fn := f.dnsFault.Load(); fn != nil && len(req.Question) > 0 {
		fault = (*fn)(q)
	}
	if fault.Drop {
		return
	}
	if fault.Delay > 0 {
		t := time.NewTimer(fault.Delay)
		select {
		case <-t.C:
		case <-f.ctx.Done():
			t.Stop()
			return
		}
	}
	_ = w.WriteMsg(f.answer(req, fault.HideTXT))
}

// answer builds the reply to req, per protocol §2.7.
func (f *Forge) answer(req *dns.Msg, hideTXT bool) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(req)
	if req.Opcode != dns.OpcodeQuery {
		m.SetRcode(req, dns.RcodeNotImplemented)
		return m
	}
	if len(req.Question) != 1 {
		m.SetRcode(req, dns.RcodeFormatError)
		return m
	}
	q := req.Question[0]
	zone := dns.Fqdn(f.Domain)
	name := strings.ToLower(dns.Fqdn(q.Name))
	if q.Qclass != dns.ClassINET || (name != zone && !strings.HasSuffix(name, "."+zone)) {
		m.SetRcode(req, dns.RcodeRefused)
		return m
	}
	m.Authoritative = true

	if name == zone {
		if q.Qtype == dns.TypeSOA {
			m.Answer = append(m.Answer, f.soa())
		} else {
			m.Ns = append(m.Ns, f.soa())
		}
		return m
	}

	labels := strings.Split(strings.TrimSuffix(name, "."+zone), ".")
	if !isPeerLabel(labels[len(labels)-1]) || len(labels) > 2 {
		m.Rcode = dns.RcodeNameError
		m.Ns = append(m.Ns, f.soa())
		return m
	}
	if len(labels) == 1 { // <peer> alone: keep the subtree alive (RFC 8020)
		m.Ns = append(m.Ns, f.soa())
		return m
	}

	hdr := dns.RR_Header{Name: q.Name, Rrtype: q.Qtype, Class: dns.ClassINET}
	if labels[0] == acmePrefix {
		if q.Qtype != dns.TypeTXT {
			return m // NODATA without SOA, as the public forge answers
		}
		id, _ := peer.Decode(labels[1])
		value, ok := f.store.get(id)
		if !ok || hideTXT {
			value = notSetYet
		}
		hdr.Ttl = ttlTXT
		m.Answer = append(m.Answer, &dns.TXT{Hdr: hdr, Txt: []string{value}})
		return m
	}

	hdr.Ttl = ttlIP
	switch q.Qtype {
	case dns.TypeA:
		if ip, ok := parseIPv4Label(labels[0]); ok {
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr, A: ip.AsSlice()})
			return m
		}
	case dns.TypeAAAA:
		if ip, ok := parseIPv6Label(labels[0]); ok {
			m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr, AAAA: ip.AsSlice()})
			return m
		}
	}
	m.Ns = append(m.Ns, f.soa())
	return m
}

func (f *Forge) soa() *dns.SOA {
	zone := dns.Fqdn(f.Domain)
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: ttlSOA},
		Ns:      "ns1." + zone,
		Mbox:    "hostmaster." + zone,
		Serial:  1,
		Refresh: 86400,
		Retry:   2400,
		Expire:  604800,
		Minttl:  ttlSOA,
	}
}

// isPeerLabel reports whether label (already lower case) names a peer:
// anything peer.Decode accepts, in practice a base36 CIDv1.
func isPeerLabel(label string) bool {
	_, err := peer.Decode(label)
	return err == nil
}

// parseIPv4Label parses "203-0-113-1" strictly (no leading zeros).
func parseIPv4Label(label string) (netip.Addr, bool) {
	ip, err := netip.ParseAddr(strings.ReplaceAll(label, "-", "."))
	if err != nil || !ip.Is4() {
		return netip.Addr{}, false
	}
	return ip, true
}

// parseIPv6Label parses "2001-db8--1"; zones are rejected.
func parseIPv6Label(label string) (netip.Addr, bool) {
	ip, err := netip.ParseAddr(strings.ReplaceAll(label, "-", ":"))
	if err != nil || !ip.Is6() || ip.Zone() != "" {
		return netip.Addr{}, false
	}
	return ip, true
}
