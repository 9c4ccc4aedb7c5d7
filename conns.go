package autotls

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
)

// conns dials the connections of the HTTP transports a manager owns (to the
// CA, and to the broker unless the user gave a client) and closes every one
// of them with the host, busy or idle. Closing idle connections is not
// enough: when a request is cancelled, an HTTP/2 connection stays busy
// until another goroutine has reset the stream, and would then live until
// its idle timeout.
type conns struct {
	dialer net.Dialer
	open   sync.Map // *trackedConn → struct{}
	closed atomic.Bool
}

var errHostClosed = errors.New("the host is closing")

// dial is an http.Transport's DialContext.
func (c *conns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if c.closed.Load() {
		return nil, errHostClosed
	}
	conn, err := c.dialer.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: conn, c: c}
	c.open.Store(tc, struct{}{})
	if c.closed.Load() { // closeAll may have missed it
		tc.Close()
		return nil, errHostClosed
	}
	return tc, nil
}

// closeAll closes every connection and refuses new ones.
func (c *conns) closeAll() {
	c.closed.Store(true)
	c.open.Range(func(k, _ any) bool {
		k.(*trackedConn).Close()
		return true
	})
}

type trackedConn struct {
	net.Conn
	c *conns
}

func (t *trackedConn) Close() error {
	t.c.open.Delete(t)
	return t.Conn.Close()
}
