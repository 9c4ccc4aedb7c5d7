package testforge

import (
	"fmt"
	"net"
	"sync"
)

// brokerSwitch serializes BrokerDown and BrokerUp.
var brokerSwitch sync.Mutex

// BrokerDown stops the broker from accepting connections: its listening
// socket is closed, so a connection to [Forge.BrokerURL] is refused, and
// its open connections are closed. [Forge.BrokerUp] brings it back on the
// same address. A hook set with [Forge.SetBrokerFault] cannot do this:
// it runs only once a connection was accepted.
func (f *Forge) BrokerDown() error {
	brokerSwitch.Lock()
	defer brokerSwitch.Unlock()
	if err := f.broker.srv.Listener.Close(); err != nil {
		return fmt.Errorf("testforge: closing the broker's listener: %w", err)
	}
	f.broker.srv.CloseClientConnections()
	return nil
}

// BrokerUp listens again, on the broker's address, after [Forge.BrokerDown]
// (it fails if the broker is not down).
func (f *Forge) BrokerUp() error {
	brokerSwitch.Lock()
	defer brokerSwitch.Unlock()
	ln, err := net.Listen("tcp", f.broker.srv.Listener.Addr().String())
	if err != nil {
		return fmt.Errorf("testforge: listening again on the broker's address: %w", err)
	}
	// The server's Close closes its Listener field: point it at the new
	// one, so that Close ends the Serve below.
	f.broker.srv.Listener = ln
	srv := f.broker.srv.Config
	go func() { _ = srv.Serve(ln) }()
	return nil
}
