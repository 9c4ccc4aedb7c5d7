package autotls

// The broker client's close: it waits for calls in flight, then closes its
// connections, and sends nothing afterwards.

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// endingTransport is a caller's transport that records when a round trip
// has ended, after lingering a little on a failure (so that a close that
// did not wait for it would be seen returning first).
type endingTransport struct {
	next  *http.Transport
	ended atomic.Int64
}

func (t *endingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	if err != nil {
		time.Sleep(100 * time.Millisecond)
	}
	t.ended.Add(1)
	return resp, err
}

func (t *endingTransport) CloseIdleConnections() { t.next.CloseIdleConnections() }

func TestBrokerClientClose(t *testing.T) {
	for _, tc := range []struct {
		name   string
		client func() *http.Client // nil: the default
	}{
		{"default client", nil},
		{"caller's client", func() *http.Client {
			return &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
		}},
	} {
		t.Run(tc.name+"/idle connection", func(t *testing.T) {
			s := newAuthTestServer(t)
			s.setBefore(answerHealth)
			c := newTestBrokerClient(t, s.srv.URL, func(cfg *brokerConfig) {
				if tc.client != nil {
					cfg.HTTPClient = tc.client()
				}
			})
			if err := c.health(t.Context()); err != nil {
				t.Fatalf("health: %v", err)
			}
			if opened, open := s.conns.counts(); opened != 1 || open != 1 {
				t.Fatalf("%d connections opened, %d open; want 1 idle", opened, open)
			}
			c.close()
			s.conns.waitAllClosed(t, 10*time.Second)
		})
	}

	t.Run("request in flight", func(t *testing.T) {
		s := newAuthTestServer(t)
		// Two health checks at once leave two connections; the registration
		// then hangs on one of them while the other stays idle.
		var arrived sync.WaitGroup
		arrived.Add(2)
		s.setBefore(func(w http.ResponseWriter, r *http.Request) bool {
			if r.URL.Path != healthPath {
				return false
			}
			arrived.Done()
			arrived.Wait()
			return answerHealth(w, r)
		})
		reached := make(chan struct{})
		s.setApp(func(w http.ResponseWriter, r *http.Request) {
			close(reached)
			<-r.Context().Done() // hang until the client goes away
		})
		tr := &endingTransport{next: http.DefaultTransport.(*http.Transport).Clone()}
		c := newTestBrokerClient(t, s.srv.URL, func(cfg *brokerConfig) { cfg.HTTPClient = &http.Client{Transport: tr} })
		var checks sync.WaitGroup
		for range 2 {
			checks.Go(func() {
				if err := c.health(t.Context()); err != nil {
					t.Errorf("health: %v", err)
				}
			})
		}
		checks.Wait()

		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		errc := make(chan error, 1)
		go func() { errc <- c.register(ctx, testChallengeValue, testAddrs) }()
		select {
		case <-reached:
		case err := <-errc:
			t.Fatalf("register returned before hanging: %v", err)
		}
		roundTrips := tr.ended.Load() // 2 health checks and the handshake's first leg
		cancel()
		c.close()
		if n := tr.ended.Load(); n != roundTrips+1 {
			t.Errorf("close returned with the registration's round trip not ended (%d of %d round trips ended)", n, roundTrips+1)
		}
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Errorf("register: %v, want the cancellation", err)
		}
		s.conns.waitAllClosed(t, 10*time.Second)
		if opened, _ := s.conns.counts(); opened != 2 {
			t.Errorf("%d connections opened, want 2", opened)
		}
	})

	t.Run("calls after close", func(t *testing.T) {
		s := newAuthTestServer(t)
		s.setBefore(answerHealth)
		c := newTestBrokerClient(t, s.srv.URL, nil)
		if err := c.health(t.Context()); err != nil {
			t.Fatalf("health: %v", err)
		}
		c.close()
		c.close() // a second close is harmless
		for name, call := range map[string]func() error{
			"health":   func() error { return c.health(t.Context()) },
			"register": func() error { return c.register(t.Context(), testChallengeValue, testAddrs) },
		} {
			if err := call(); !errors.Is(err, errClientClosed) || !strings.HasPrefix(err.Error(), "broker "+name+": ") {
				t.Errorf("%s after close: %v, want errClientClosed", name, err)
			}
		}
		if n := s.requests(); n != 1 {
			t.Errorf("%d requests at the broker, want only the one before close", n)
		}
		if opened, _ := s.conns.counts(); opened != 1 {
			t.Errorf("%d connections opened, want only the one before close", opened)
		}
		s.conns.waitAllClosed(t, 10*time.Second)
	})
}

func TestBrokerClientCloseConcurrent(t *testing.T) {
	// Calls racing close either complete or fail as closed; once close has
	// returned, nothing is left open (run with -race: no Add after Wait).
	s := newAuthTestServer(t)
	var answered atomic.Int64
	busy := make(chan struct{}) // closed once some calls have been answered
	s.setBefore(func(w http.ResponseWriter, r *http.Request) bool {
		if answered.Add(1) == 20 {
			close(busy)
		}
		return answerHealth(w, r)
	})
	c := newTestBrokerClient(t, s.srv.URL, nil)
	var calls sync.WaitGroup
	start := make(chan struct{})
	for range 8 {
		calls.Go(func() {
			<-start
			for {
				err := c.health(t.Context())
				if errors.Is(err, errClientClosed) {
					return
				}
				if err != nil {
					t.Errorf("health: %v", err)
					return
				}
			}
		})
	}
	close(start)
	select {
	case <-busy:
	case <-time.After(10 * time.Second):
		t.Fatal("the calls did not reach the broker")
	}
	c.close()
	s.conns.waitAllClosed(t, 10*time.Second)
	calls.Wait()
}

// answerHealth is a before-hook answering health checks with 204.
func answerHealth(w http.ResponseWriter, r *http.Request) bool {
	if r.URL.Path != healthPath {
		return false
	}
	w.WriteHeader(http.StatusNoContent)
	return true
}
