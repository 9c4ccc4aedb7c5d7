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
	ln := f.broker.srv.Listener
	if f.broker.relisten != nil {
		ln = f.broker.relisten
	}
	if err := ln.Close(); err != nil {
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
	// The server's Listener field is read by the goroutine httptest
	// started: it is left alone, and the broker's close closes this one.
	f.broker.relisten = ln
	srv := f.broker.srv.Config
	go func() { _ = srv.Serve(ln) }()
	return nil
}
