package autotls

import (
	"time"

	ma "github.com/multiformats/go-multiaddr"
)

// CertSource says where a loaded certificate came from.
type CertSource string

const (
	// FromStorage: a valid certificate read from storage.
	FromStorage CertSource = "storage"
	// Obtained: a certificate issued for the first time.
	Obtained CertSource = "obtained"
	// Renewed: a certificate issued to replace one that was due for renewal.
	Renewed CertSource = "renewed"
)

// EvtCertificateLoaded is emitted on the host's event bus each time a
// certificate starts being served: from storage (at start, or stored by
// another process sharing it), after the first issuance, and after each
// renewal. It is stateful: a late subscriber receives the current one.
type EvtCertificateLoaded struct {
	// Names are the certificate's DNS names: *.<peerid>.<forge-domain>.
	Names []string
	// NotBefore and NotAfter bound the certificate's validity.
	NotBefore, NotAfter time.Time
	// Source says where it came from.
	Source CertSource
}

// EvtCertificateExpired is emitted when the served certificate expires
// without a replacement. The WSS listeners close and their addresses are
// withdrawn until a new certificate is loaded.
type EvtCertificateExpired struct {
	Names    []string
	NotAfter time.Time
}

// EvtIssuanceFailed is emitted when an attempt to obtain or renew the
// certificate fails. The certificate in use, if any, stays in use. It is
// not stateful: an [EvtCertificateLoaded] after it ends the failure.
type EvtIssuanceFailed struct {
	// Err is the cause; a *[BrokerError] when the broker refused.
	Err error
	// Attempt counts consecutive failures, from 1.
	Attempt int
	// NextRetry is when the next attempt is due.
	NextRetry time.Time
	// Renewal is true when a valid certificate is still being served.
	Renewal bool
}

// Reachability is what the certificate manager has concluded about the
// host's reachability from the internet over TCP, the transport a browser
// dials. A certificate is only requested, first or renewed, while it is
// [ReachabilityPublic] (unless [WithAllowPrivateAddrs]).
type Reachability string

const (
	// ReachabilityUnknown: AutoNAT has not confirmed a public TCP address
	// yet, nor found one unreachable.
	ReachabilityUnknown Reachability = "unknown"
	// ReachabilityPublic: a public TCP address is confirmed reachable, by
	// AutoNAT v2 for that address, or by AutoNAT v1 for the host when its
	// verdict can only concern TCP (or libp2p.ForceReachabilityPublic).
	ReachabilityPublic Reachability = "public"
	// ReachabilityUnreachable: AutoNAT v2 dialled a public TCP address of
	// the host and could not connect, and confirmed none: the port is not
	// forwarded, or a firewall drops it.
	ReachabilityUnreachable Reachability = "unreachable"
	// ReachabilityNoPeers: no peer has been connected for a minute, and
	// AutoNAT has no one to ask.
	ReachabilityNoPeers Reachability = "no-peers"
)

// EvtReachabilityChanged is emitted when the host's [Reachability], or the
// TCP addresses it concerns, change. It is stateful: a late subscriber
// receives the current one. It is not emitted with [WithAllowPrivateAddrs],
// which skips the reachability check.
type EvtReachabilityChanged struct {
	Reachability Reachability
	// Addrs are the TCP addresses confirmed reachable (the ones sent to the
	// broker for its dial-back) with [ReachabilityPublic], or found
	// unreachable with [ReachabilityUnreachable]; nil otherwise.
	Addrs []ma.Multiaddr
}
