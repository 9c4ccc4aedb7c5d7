package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/p2ptls/autotls/internal/layout"
	"github.com/p2ptls/autotls/internal/testforge"
)

// doctorArgs point the doctor at f, as a host using f runs, for is and
// its TCP address on loopback.
func doctorArgs(t *testing.T, f *testforge.Forge, is issued, extra ...string) []string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "ca-root.pem")
	if err := os.WriteFile(root, f.CARootPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return append([]string{"doctor",
		"-storage", is.dir, "-identity", is.keyFile,
		"-forge", f.Domain, "-endpoint", f.BrokerURL, "-ca", f.CAURL, "-ca-root", root,
		"-dns", f.DNSAddr, "-addr", "/ip4/127.0.0.1/tcp/" + is.tcpPort,
	}, extra...)
}

// TestDoctor runs every check against the offline forge after a real
// issuance, then with each part broken in turn.
func TestDoctor(t *testing.T) {
	f := testforge.New(t, testforge.Config{})
	is := issue(t, f)
	txtValue, ok := f.TXT(is.id)
	if !ok {
		t.Fatal("the forge holds no TXT record for the host")
	}
	label := layout.PeerLabel(is.id)
	addr := "/ip4/127.0.0.1/tcp/" + is.tcpPort
	line := func(status, name, text string) string { return fmt.Sprintf("%-4s %-12s %s", status, name, text) }
	storageOK := line("ok", "storage", is.dir+" is readable and writable")
	certOK := line("ok", "certificate", certLines(f, is)[0][len("certificate  "):])
	brokerOK := line("ok", "broker", f.BrokerURL+"/v1/health answers 204")
	txtOK := line("ok", "dns", fmt.Sprintf("_acme-challenge.%s.%s answers through %s (TXT %q)", label, f.Domain, f.DNSAddr, txtValue))
	aOK := line("ok", "dns", fmt.Sprintf("127-0-0-1.%s.%s resolves to 127.0.0.1 through %s", label, f.Domain, f.DNSAddr))
	caOK := line("ok", "ca", f.CAURL+" is an ACME directory")
	addrPrivateOK := line("ok", "address", addr+" is not public; fine with -allow-private (WithAllowPrivateAddrs)")

	t.Run("healthy", func(t *testing.T) {
		out, code := cmd(t, doctorArgs(t, f, is, "-allow-private")...)
		checkOutput(t, out, code, lines(storageOK, certOK, brokerOK, txtOK, aOK, caOK, addrPrivateOK), 0)
	})
	t.Run("private address", func(t *testing.T) {
		out, code := cmd(t, doctorArgs(t, f, is)...)
		checkOutput(t, out, code, lines(storageOK, certOK, brokerOK, txtOK, aOK, caOK,
			line("FAIL", "address", addr+" is not public (127.0.0.1): the broker cannot dial it back; forward a public TCP port to the host or enable UPnP, or run your own forge with WithAllowPrivateAddrs")), 1)
	})
	t.Run("no address given", func(t *testing.T) {
		args := doctorArgs(t, f, is)
		args = args[:len(args)-2] // drop -addr
		out, code := cmd(t, args...)
		checkOutput(t, out, code, lines(storageOK, certOK, brokerOK, txtOK, caOK,
			line("--", "address", "none given (-addr); the host learns its public TCP addresses from AutoNAT")), 0)
	})
	t.Run("broker down", func(t *testing.T) {
		if err := f.BrokerDown(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := f.BrokerUp(); err != nil {
				t.Fatal(err)
			}
		}()
		out, code := cmd(t, doctorArgs(t, f, is, "-allow-private")...)
		checkOutput(t, out, code, lines(storageOK, certOK,
			line("FAIL", "broker", f.BrokerURL+"/v1/health is unreachable (connection refused); check the network and -endpoint; the host waits for the broker before its first request"),
			txtOK, aOK, caOK, addrPrivateOK), 1)
	})
	t.Run("CA unreachable", func(t *testing.T) {
		// A port nothing listens on, on a host with empty storage: its
		// first certificate cannot be had.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		deadCA := "https://" + ln.Addr().String() + "/dir"
		_ = ln.Close()
		fresh := is
		fresh.dir = filepath.Join(t.TempDir(), "store")
		out, code := cmd(t, doctorArgs(t, f, fresh, "-allow-private", "-ca", deadCA)...)
		checkOutput(t, out, code, lines(
			line("ok", "storage", fresh.dir+" is readable and writable"),
			line("ok", "certificate", "none stored for this name and CA; the host requests one once it is publicly reachable"),
			brokerOK, txtOK, aOK,
			line("FAIL", "ca", deadCA+" is unreachable (connection refused); the host can neither get nor renew a certificate until it is: check the network, a firewall or proxy, and -ca"),
			addrPrivateOK), 1)
	})
	t.Run("CA root not given", func(t *testing.T) {
		// The system roots, which do not hold the forge's.
		out, code := cmd(t, withoutFlag(doctorArgs(t, f, is, "-allow-private"), "-ca-root")...)
		checkOutput(t, out, code, lines(storageOK, certOK, brokerOK, txtOK, aOK,
			line("FAIL", "ca", f.CAURL+" presents a certificate no trusted root signed; pass the CA's root with -ca-root, or look for a proxy intercepting TLS"),
			addrPrivateOK), 1)
	})
	t.Run("wrong forge domain", func(t *testing.T) {
		// The DNS server answers for f.Domain only: a host configured for
		// another domain is told its names do not resolve.
		args := withoutFlag(doctorArgs(t, f, is, "-allow-private"), "-forge")
		args = append(args, "-forge", "example.net")
		out, code := cmd(t, args...)
		checkOutput(t, out, code, lines(storageOK,
			line("ok", "certificate", "none stored for this name and CA; the host requests one once it is publicly reachable"),
			brokerOK,
			line("FAIL", "dns", fmt.Sprintf("_acme-challenge.%s.example.net does not resolve through %s (server misbehaving); the CA cannot validate a challenge: check -forge and -dns", label, f.DNSAddr)),
			line("FAIL", "dns", fmt.Sprintf("127-0-0-1.%s.example.net does not resolve through %s (server misbehaving); browsers cannot find the host at 127.0.0.1", label, f.DNSAddr)),
			caOK, addrPrivateOK), 1)
	})
	t.Run("DNS server down", func(t *testing.T) {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := pc.LocalAddr().String()
		_ = pc.Close()
		args := append(withoutFlag(doctorArgs(t, f, is, "-allow-private"), "-dns"), "-dns", dead, "-timeout", "2s")
		out, code := cmd(t, args...)
		checkOutput(t, out, code, lines(storageOK, certOK, brokerOK,
			line("FAIL", "dns", fmt.Sprintf("_acme-challenge.%s.%s does not resolve through %s (connection refused: no DNS server there); the CA cannot validate a challenge: check -forge and -dns", label, f.Domain, dead)),
			line("FAIL", "dns", fmt.Sprintf("127-0-0-1.%s.%s does not resolve through %s (connection refused: no DNS server there); browsers cannot find the host at 127.0.0.1", label, f.Domain, dead)),
			caOK, addrPrivateOK), 1)
	})
	t.Run("storage unwritable", func(t *testing.T) {
		d := copyStore(t, is)
		readOnly(t, d.dir)
		out, code := cmd(t, doctorArgs(t, f, d, "-allow-private")...)
		checkOutput(t, out, code, lines(
			line("FAIL", "storage", d.dir+" is not writable (permission denied); make it writable by the user the host runs as: the host keeps its certificate, key and ACME account there"),
			certOK, brokerOK, txtOK, aOK, caOK, addrPrivateOK), 1)
	})
	t.Run("truncated certificate", func(t *testing.T) {
		d := copyStore(t, is)
		p := storePath(d.dir, layout.CertKey(layout.IssuerKey(f.CAURL), f.CertName(is.id)))
		if err := os.WriteFile(p, []byte("-----BEGIN CERTIFICATE-----\nMIIB"), 0o600); err != nil {
			t.Fatal(err)
		}
		out, code := cmd(t, doctorArgs(t, f, d, "-allow-private")...)
		checkOutput(t, out, code, lines(
			line("ok", "storage", d.dir+" is readable and writable"),
			line("FAIL", "certificate", "unusable: certificate chain: block 1 of 1 is truncated; the host moves it aside at its next start and requests a new one"),
			brokerOK, txtOK, aOK, caOK, addrPrivateOK), 1)
	})
}

// withoutFlag removes a flag and its value from args.
func withoutFlag(args []string, name string) []string {
	var out []string
	for i := 0; i < len(args); i++ {
		if args[i] == name {
			i++
			continue
		}
		out = append(out, args[i])
	}
	return out
}

// readOnly makes the tree at dir unwritable until the test ends: by
// permissions for a user, and by the immutable attribute for root, whom
// permissions do not stop (skipping the test where that is not allowed).
func readOnly(t *testing.T, dir string) {
	t.Helper()
	if os.Geteuid() != 0 {
		if err := exec.Command("chmod", "-R", "a-w", dir).Run(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = exec.Command("chmod", "-R", "u+w", dir).Run() })
		return
	}
	if out, err := exec.Command("chattr", "-R", "+i", dir).CombinedOutput(); err != nil {
		t.Skipf("as root, a directory is made unwritable with chattr +i, which fails here: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("chattr", "-R", "-i", dir).Run() })
}
