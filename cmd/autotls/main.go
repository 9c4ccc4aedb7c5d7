// Command autotls shows what autotls keeps for a host and checks what it
// needs, from the shell.
//
//	autotls status -peer <PeerID>   what storage holds for the host: its certificate
//	                                (names, validity, issuer), a pending order, the
//	                                ACME account, the certificates issued lately; no network
//	autotls doctor -peer <PeerID>   storage readable and writable, the certificate, the
//	                                broker's health, the forge's DNS, the CA's directory,
//	                                and whether the host's addresses are public
//
// Both read the storage the library writes: by default the directory of
// storage.Default (the one autotls.Option uses without WithStorage), or
// -storage. The host is named by -peer, or by -identity, a file holding
// its private key as libp2p's crypto.MarshalPrivateKey writes it (the
// examples/node format). The defaults are production's (libp2p.direct,
// Let's Encrypt); -forge, -endpoint, -ca, -ca-root and -dns point the
// command at another forge, such as a local one.
//
// status exits 0 when a valid certificate is stored, 1 when not; doctor
// exits 0 when every check passes, 1 when one fails; both exit 2 on bad
// flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/internal/layout"
	"github.com/p2ptls/autotls/storage"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `usage:
  autotls status [flags]   what storage holds for the host (no network)
  autotls doctor [flags]   check storage, broker, DNS, CA and addresses
Run "autotls status -h" or "autotls doctor -h" for the flags.
`

// run runs the command with args (without the program name) and returns
// its exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "status":
		return runStatus(ctx, args[1:], stdout, stderr)
	case "doctor":
		return runDoctor(ctx, args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "autotls: unknown command %q\n%s", args[0], usage)
	return 2
}

// target is the host whose storage is read, and where: the flags status
// and doctor share.
type target struct {
	dir      string
	peerID   string
	identity string
	forge    string
	caURL    string
	email    string

	id     peer.ID
	name   string // "*.<peer label>.<forge>"
	issuer string // layout.IssuerKey(caURL)
}

func (t *target) flags(fs *flag.FlagSet) {
	fs.StringVar(&t.dir, "storage", "", "the storage directory (default: storage.DefaultDir(), where autotls.Option stores without WithStorage)")
	fs.StringVar(&t.peerID, "peer", "", "the host's PeerID")
	fs.StringVar(&t.identity, "identity", "", "a file with the host's private key, as crypto.MarshalPrivateKey writes it (instead of -peer)")
	fs.StringVar(&t.forge, "forge", autotls.DefaultForgeDomain, "the forge domain (WithForgeDomain)")
	fs.StringVar(&t.caURL, "ca", autotls.DefaultCA, "the CA's ACME directory URL (WithCA)")
	fs.StringVar(&t.email, "email", "", "the ACME contact email the host uses (WithEmail), which names its account")
}

// resolve checks the flags and derives the names; its errors are one line
// for the user.
func (t *target) resolve() error {
	switch {
	case t.peerID != "" && t.identity != "":
		return errors.New("give -peer or -identity, not both")
	case t.peerID != "":
		id, err := peer.Decode(t.peerID)
		if err != nil {
			return fmt.Errorf("-peer %q is not a PeerID: %v", t.peerID, err)
		}
		t.id = id
	case t.identity != "":
		raw, err := os.ReadFile(t.identity)
		if err != nil {
			return fmt.Errorf("reading the identity key: %v", err)
		}
		k, err := crypto.UnmarshalPrivateKey(raw)
		if err != nil {
			return fmt.Errorf("-identity %s holds no libp2p private key (crypto.MarshalPrivateKey's format): %v", t.identity, err)
		}
		if t.id, err = peer.IDFromPrivateKey(k); err != nil {
			return fmt.Errorf("-identity %s: %v", t.identity, err)
		}
	default:
		return errors.New("name the host: -peer <PeerID>, or -identity <key file>")
	}
	t.forge = strings.TrimSuffix(strings.ToLower(strings.TrimSpace(t.forge)), ".")
	if t.forge == "" {
		return errors.New("-forge is empty")
	}
	if t.caURL == "" {
		return errors.New("-ca is empty")
	}
	if t.dir == "" {
		d, err := storage.DefaultDir()
		if err != nil {
			return fmt.Errorf("%v; pass -storage", err)
		}
		t.dir = d
	}
	t.name = layout.CertName(t.id, t.forge)
	t.issuer = layout.IssuerKey(t.caURL)
	return nil
}

// example is how the examples/node program's storage is named.
const example = `
examples/node -production keeps its key and storage in the per-user data
directory (here as on Linux; see storage.DefaultDir for other systems):

  autotls %s -identity ~/.local/share/autotls/identity.key -storage ~/.local/share/autotls/certmagic
`

// parse parses args into fs, then resolves t. It returns -1 to go on, or
// the exit status: 0 after -h, 2 after a problem reported on stderr.
func parse(fs *flag.FlagSet, t *target, args []string, about string, stderr io.Writer) int {
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: autotls %s [flags]\n\n%s\n\n", fs.Name(), about)
		fs.PrintDefaults()
		fmt.Fprintf(stderr, example, fs.Name())
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "autotls %s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return 2
	}
	if err := t.resolve(); err != nil {
		fmt.Fprintf(stderr, "autotls %s: %v\n", fs.Name(), err)
		return 2
	}
	return -1
}
