package autotlstest_test

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/p2ptls/autotls/autotlstest"
)

// TestNothingOutlivesTheTest: once a test that used the kit has ended,
// no goroutine of the forge, of the host under test (closed by the kit,
// though the test never closed it) or of the peer is left.
func TestNothingOutlivesTheTest(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Run("test", func(t *testing.T) {
		f := autotlstest.New(t)
		f.BrokerDown() // and back: the broker's second listener ends too
		f.BrokerUp()
		h := newHost(t, f, nil)
		pingOverWSS(t, f, h, f.WaitBrowserAddr(t, h))
	})
	goleak.VerifyNone(t, ignore,
		// Process-wide workers some dependencies start once.
		goleak.IgnoreAnyFunction("github.com/ipfs/go-log/v2/writer.(*MirrorWriter).logRoutine"),
		goleak.IgnoreAnyFunction("go.opencensus.io/stats/view.(*worker).start"),
		goleak.IgnoreAnyFunction("github.com/libp2p/go-libp2p/p2p/transport/quicreuse.(*reuse).gc"),
	)
}
