package autotls

import (
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/p2ptls/autotls/storage"
)

// Production defaults.
const (
	// DefaultForgeDomain is the public forge domain run by Interplanetary Shipyard.
	DefaultForgeDomain = "libp2p.direct"
	// DefaultRegistrationEndpoint is the broker of [DefaultForgeDomain].
	DefaultRegistrationEndpoint = "https://registration.libp2p.direct"
	// DefaultCA is the ACME directory of Let's Encrypt's production CA.
	DefaultCA = "https://acme-v02.api.letsencrypt.org/directory"

	letsEncryptStaging = "https://acme-staging-v02.api.letsencrypt.org/directory"
)

// Opt configures [Option]. Each WithXxx function documents what happens
// without it.
type Opt func(*config) error

type config struct {
	forgeDomain          string
	registrationEndpoint string
	caURL                string
	caRoots              *x509.CertPool
	storage              certmagic.Storage
	allowPrivate         bool
	resolver             *net.Resolver
	shortAddrs           bool
	registrationDelay    time.Duration
	accessToken          string
	userAgent            string
	email                string
	logger               *slog.Logger
	httpClient           *http.Client

	// For this package's tests; not public API.
	clock     clock
	profile   string
	onManager func(*manager)
	// isPublic, if set, replaces manet.IsPublicAddr: loopback tests of the
	// reachability gate treat 127.0.0.1 as public.
	isPublic func(ma.Multiaddr) bool
}

// public reports whether a is a public address, one the internet can reach.
func (c *config) public(a ma.Multiaddr) bool {
	if c.isPublic != nil {
		return c.isPublic(a)
	}
	return manet.IsPublicAddr(a)
}

// WithForgeDomain sets the forge domain under which the certificate is
// issued (*.<peerid>.<domain>). Without it, [DefaultForgeDomain] is used. A
// custom domain needs [WithRegistrationEndpoint] too.
func WithForgeDomain(domain string) Opt {
	return func(c *config) error {
		d, err := normalizeForgeDomain(domain)
		if err != nil {
			return fmt.Errorf("WithForgeDomain(%q): %w", domain, err)
		}
		c.forgeDomain = d
		return nil
	}
}

// WithRegistrationEndpoint sets the base URL of the forge's broker (the
// client appends /v1/health and /v1/_acme-challenge). Without it,
// [DefaultRegistrationEndpoint] is used with the default forge domain, and
// [Option] fails with any other domain.
func WithRegistrationEndpoint(endpoint string) Opt {
	return func(c *config) error {
		u, err := url.Parse(endpoint)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("WithRegistrationEndpoint(%q): want an absolute http or https URL such as %s", endpoint, DefaultRegistrationEndpoint)
		}
		c.registrationEndpoint = strings.TrimRight(endpoint, "/")
		return nil
	}
}

// WithCA sets the ACME directory URL of the certificate authority, and the
// roots its HTTPS endpoint is verified with (nil: the system roots). Without
// it, Let's Encrypt's production CA ([DefaultCA]) is used. Certificates from
// a staging or private CA are not trusted by browsers.
func WithCA(directoryURL string, roots *x509.CertPool) Opt {
	return func(c *config) error {
		u, err := url.Parse(directoryURL)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return fmt.Errorf("WithCA(%q): want the https URL of an ACME directory, such as %s", directoryURL, DefaultCA)
		}
		c.caURL = directoryURL
		c.caRoots = roots
		return nil
	}
}

// WithStorage sets where certificates, their keys and the ACME account are
// kept. Keep it persistent: the CA issues at most five certificates per name
// per week. Without it, the on-disk store of [storage.Default] is used, in
// a per-user data directory.
func WithStorage(s certmagic.Storage) Opt {
	return func(c *config) error {
		if s == nil {
			return errors.New("WithStorage(nil): pass a certmagic.Storage, for example storage.Memory() or storage.Dir(path)")
		}
		c.storage = s
		return nil
	}
}

// WithAllowPrivateAddrs skips the public-reachability gate and lets private
// and loopback addresses be sent to the broker and announced. It is for
// tests and LANs: a public broker cannot dial private addresses back.
// Without it, certificates are only requested (and renewed) once AutoNAT
// confirms a public TCP address, only public TCP addresses are sent to the
// broker, and only public addresses are announced; [Option] turns on
// AutoNAT v2 for that.
func WithAllowPrivateAddrs() Opt {
	return func(c *config) error {
		c.allowPrivate = true
		return nil
	}
}

// WithResolver sets the resolver used to confirm that the broker has
// published the DNS-01 TXT record before the CA is asked to validate it.
// Without it, [net.DefaultResolver] is used.
func WithResolver(r *net.Resolver) Opt {
	return func(c *config) error {
		if r == nil {
			return errors.New("WithResolver(nil): pass a *net.Resolver")
		}
		c.resolver = r
		return nil
	}
}

// WithShortAddrs announces the short form
// /dns4/<ip>.<peerid>.<forge>/tcp/<port>/tls/ws instead of the long form
// /ip4/<ip>/tcp/<port>/tls/sni/<ip>.<peerid>.<forge>/ws. The short form needs
// a DNS lookup by the dialer. Without it, the long form is announced.
func WithShortAddrs() Opt {
	return func(c *config) error {
		c.shortAddrs = true
		return nil
	}
}

// WithRegistrationDelay waits d after the host starts before the first
// certificate request, giving AutoNAT and port mapping time to settle.
// Without it there is no delay beyond the reachability gate. A stored
// certificate is served at once regardless.
func WithRegistrationDelay(d time.Duration) Opt {
	return func(c *config) error {
		if d < 0 {
			return fmt.Errorf("WithRegistrationDelay(%v): the delay must not be negative", d)
		}
		c.registrationDelay = d
		return nil
	}
}

// WithAccessToken sets the shared secret sent to the broker in the
// Forge-Authorization header, for brokers that require one. Without it, the
// FORGE_ACCESS_TOKEN environment variable is used if set. The token is never
// logged.
func WithAccessToken(token string) Opt {
	return func(c *config) error {
		c.accessToken = token
		return nil
	}
}

// WithUserAgent sets the User-Agent sent to the broker and the CA. Without
// it, "github.com/p2ptls/autotls@<version>" is used.
func WithUserAgent(ua string) Opt {
	return func(c *config) error {
		c.userAgent = ua
		return nil
	}
}

// WithEmail sets the contact address of the ACME account, to which the CA
// may send expiry notices. Without it, the account has no contact.
func WithEmail(email string) Opt {
	return func(c *config) error {
		if email != "" && !strings.Contains(email, "@") {
			return fmt.Errorf("WithEmail(%q): not an email address", email)
		}
		c.email = email
		return nil
	}
}

// WithLogger sets the logger. Without it, [slog.Default] is used with the
// attribute subsystem=autotls. Only events worth an operator's attention
// are logged above debug level.
func WithLogger(l *slog.Logger) Opt {
	return func(c *config) error {
		if l == nil {
			return errors.New("WithLogger(nil): pass a *slog.Logger")
		}
		c.logger = l
		return nil
	}
}

// WithHTTPClient sets the HTTP client used for the broker. Without it, a
// client with conservative timeouts is used. The client is copied, not
// modified; a cookie jar is added to the copy if it has none.
func WithHTTPClient(hc *http.Client) Opt {
	return func(c *config) error {
		if hc == nil {
			return errors.New("WithHTTPClient(nil): pass an *http.Client")
		}
		c.httpClient = hc
		return nil
	}
}

// newConfig applies opts over the production defaults and checks that the
// result is usable.
func newConfig(opts []Opt) (*config, error) {
	c := &config{
		forgeDomain: DefaultForgeDomain,
		caURL:       DefaultCA,
		resolver:    net.DefaultResolver,
		clock:       realClock{},
	}
	for _, o := range opts {
		if o == nil {
			continue
		}
		if err := o(c); err != nil {
			return nil, err
		}
	}
	if c.registrationEndpoint == "" {
		if c.forgeDomain != DefaultForgeDomain {
			return nil, fmt.Errorf("forge domain %q needs its broker: add WithRegistrationEndpoint", c.forgeDomain)
		}
		c.registrationEndpoint = DefaultRegistrationEndpoint
	}
	if c.logger == nil {
		c.logger = slog.Default().With("subsystem", "autotls")
	}
	if c.storage == nil {
		s, err := storage.Default(storage.WithLogger(c.logger))
		if err != nil {
			return nil, fmt.Errorf("opening the default certificate storage: %w", err)
		}
		c.storage = s
	}
	if c.caURL == letsEncryptStaging {
		c.logger.Warn("using Let's Encrypt staging: its certificates are not trusted by browsers")
	}
	return c, nil
}
