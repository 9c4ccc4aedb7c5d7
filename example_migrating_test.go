package autotls_test

import (
	"log"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/storage"
)

// A program moved from p2p-forge's client, keeping Kubo's defaults and the
// directory the client stored its certificate in (docs/migrating.md).
func ExampleOption_migrating() {
	var (
		key    crypto.PrivKey // the identity the node had: the certificate's name
		repo   string         // where the old client kept p2p-forge-certs
		logger = slog.Default()
	)
	run := func() error {
		certs, err := storage.Dir(filepath.Join(repo, "p2p-forge-certs")) // the same directory
		if err != nil {
			return err
		}
		h, err := libp2p.New(
			libp2p.Identity(key),
			libp2p.ListenAddrStrings("/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"),
			autotls.Option(
				autotls.WithStorage(certs),
				autotls.WithEmail("ops@example.net"),
				autotls.WithShortAddrs(),                 // Kubo's default; off in autotls
				autotls.WithRegistrationDelay(time.Hour), // Kubo's default; none in autotls
				autotls.WithLogger(logger),
			), // the access token comes from $FORGE_ACCESS_TOKEN by itself
		)
		if err != nil {
			return err
		}
		defer h.Close() // stops the certificate manager too
		sub, err := h.EventBus().Subscribe(new(autotls.EvtCertificateLoaded))
		if err != nil {
			return err
		}
		defer sub.Close()
		<-sub.Out()
		return nil
	}
	if err := run(); err != nil {
		log.Fatal(err)
	}
}
