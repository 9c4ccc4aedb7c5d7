package main

import (
	"bytes"
	"flag"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/p2ptls/autotls/storage"
)

// TestProductionConfig: the -production flags resolve to the node's
// settings and host options, without a network (nothing here starts a
// host or dials).
func TestProductionConfig(t *testing.T) {
	xdg := t.TempDir()
	t.Setenv("XDG_DATA_HOME", xdg)
	defaults, err := parsePeers(defaultBootstrapPeers)
	if err != nil {
		t.Fatalf("the default bootstrap peers: %v", err)
	}
	if len(defaults) != 5 {
		t.Fatalf("%d default bootstrap peers, want the 5 of go-libp2p-kad-dht", len(defaults))
	}
	for _, tc := range []struct {
		name          string
		args          []string
		port          int    // -port
		dataDir       string // -datadir
		wantPort      int
		wantDir       string
		wantBootstrap int
		wantPublic    bool
		wantErr       string
	}{
		{name: "defaults", wantPort: 4001, wantDir: filepath.Join(xdg, "autotls"), wantBootstrap: len(defaults)},
		{name: "port and data directory", port: 4002, dataDir: "/srv/node", wantPort: 4002, wantDir: "/srv/node", wantBootstrap: len(defaults)},
		{name: "no bootstrap peers", args: []string{"-bootstrap", "none"}, wantPort: 4001, wantDir: filepath.Join(xdg, "autotls"), wantBootstrap: 0},
		{name: "own bootstrap peers", args: []string{"-bootstrap", "/ip4/192.0.2.1/tcp/4001/p2p/QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ, /ip6/2001:db8::1/tcp/4001/p2p/QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ,/dns4/boot.example/tcp/4001/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"},
			wantPort: 4001, wantDir: filepath.Join(xdg, "autotls"), wantBootstrap: 2},
		{name: "public", args: []string{"-public"}, wantPort: 4001, wantDir: filepath.Join(xdg, "autotls"), wantBootstrap: len(defaults), wantPublic: true},
		{name: "bootstrap peer without its id", args: []string{"-bootstrap", "/ip4/192.0.2.1/tcp/4001"}, wantErr: "-bootstrap: want multiaddrs ending in /p2p/"},
		{name: "bootstrap peer not a multiaddr", args: []string{"-bootstrap", "boot.example:4001"}, wantErr: `-bootstrap: "boot.example:4001"`},
		{name: "port out of range", port: 70000, wantErr: "-port 70000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := flag.NewFlagSet("node", flag.ContinueOnError)
			pf := newProductionFlags(fs)
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			c, err := pf.config(tc.port, tc.dataDir)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one saying %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.port != tc.wantPort || c.dataDir != tc.wantDir || len(c.bootstrap) != tc.wantBootstrap || c.public != tc.wantPublic {
				t.Fatalf("config %+v, want port %d, data directory %s, %d bootstrap peers, public %v", c, tc.wantPort, tc.wantDir, tc.wantBootstrap, tc.wantPublic)
			}

			// The host options, applied to a libp2p config (no host is
			// built).
			key, err := loadOrCreateKey(filepath.Join(t.TempDir(), "identity.key"))
			if err != nil {
				t.Fatal(err)
			}
			var lc libp2p.Config
			if err := lc.Apply(c.hostOptions(key, storage.Memory(), slog.New(slog.DiscardHandler), &infoHandler{agent: agent})...); err != nil {
				t.Fatal(err)
			}
			var listen []string
			for _, a := range lc.ListenAddrs {
				listen = append(listen, a.String())
			}
			for _, want := range []string{"/ip4/0.0.0.0/tcp/", "/ip6/::/tcp/", "/ip4/0.0.0.0/udp/"} {
				if !strings.Contains(strings.Join(listen, " "), want+strconv.Itoa(tc.wantPort)) {
					t.Errorf("listen addresses %v lack %s%d", listen, want, tc.wantPort)
				}
			}
			if lc.PeerKey == nil || !lc.PeerKey.Equals(key) {
				t.Error("the host does not use the identity key")
			}
			if lc.NATManager == nil || !lc.EnableAutoNATv2 {
				t.Errorf("port mapping %v, AutoNAT v2 %v: want both", lc.NATManager != nil, lc.EnableAutoNATv2)
			}
			forced := lc.AutoNATConfig.ForceReachability
			if tc.wantPublic != (forced != nil && *forced == network.ReachabilityPublic) {
				t.Errorf("-public %v, but the forced reachability is %v", tc.wantPublic, forced)
			}
		})
	}
}

// TestIdentityKeyPersists: the production node keeps its identity (and so
// its certificate's name) across restarts; a damaged key file stops the
// node rather than being replaced by a new identity.
func TestIdentityKeyPersists(t *testing.T) {
	path := filepath.Join(t.TempDir(), "data", "identity.key")
	first, err := loadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	again, err := loadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	id1, _ := peer.IDFromPrivateKey(first)
	id2, _ := peer.IDFromPrivateKey(again)
	if id1 != id2 {
		t.Fatalf("the identity changed on restart: %s, then %s", id1, id2)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", st.Mode().Perm())
	}
	if _, err := os.Stat(path + ".new"); !os.IsNotExist(err) {
		t.Errorf("the temporary key file is left behind: %v", err)
	}

	damaged := []byte("not a key")
	if err := os.WriteFile(path, damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadOrCreateKey(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("a damaged key file: err %v, want one naming %s", err, path)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, damaged) {
		t.Fatal("the damaged key file was overwritten: the identity would be lost")
	}
}
