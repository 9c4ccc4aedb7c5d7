package autotlstest_test

import (
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/p2ptls/autotls"
	"github.com/p2ptls/autotls/autotlstest"
)

// TestNothingOutlivesTheTest: once a test that used the kit has ended,
// no goroutine of the forge, of the host under test (closed by the kit,
// though the test never closed it), of the peer or of the HTTP client is
// left.
func TestNothingOutlivesTheTest(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Run("test", func(t *testing.T) {
		f := autotlstest.New(t)
		f.BrokerDown() // and back: the broker's second listener ends too
		f.BrokerUp()
		h := newHost(t, f, nil, autotls.WithHTTPHandler(helloHandler()))
		pingOverWSS(t, f, h, f.WaitBrowserAddr(t, h))
		// An HTTP/2 connection left idle: the kit closes it.
		if _, body, err := get(t, f, autotlstest.HTTPURL(t, f.WaitHTTPAddr(t, h))+"/hello"); err != nil || !strings.HasPrefix(body, "hello over HTTP/2.0") {
			t.Fatalf("GET /hello: %q, %v", body, err)
		}
	})
	goleak.VerifyNone(t, ignore,
		// Process-wide workers some dependencies start once.
		goleak.IgnoreAnyFunction("github.com/ipfs/go-log/v2/writer.(*MirrorWriter).logRoutine"),
		goleak.IgnoreAnyFunction("go.opencensus.io/stats/view.(*worker).start"),
		goleak.IgnoreAnyFunction("github.com/libp2p/go-libp2p/p2p/transport/quicreuse.(*reuse).gc"),
	)
}
