package testforge

import (
	"sync"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// challengeTTL is how long a registered value is served, as on the public
// broker's datastore.
const challengeTTL = time.Hour

// txtStore holds one DNS-01 value per peer; the last writer wins.
type txtStore struct {
	mu      sync.Mutex
	entries map[peer.ID]txtEntry
}

type txtEntry struct {
	value   string
	expires time.Time
}

func newTXTStore() *txtStore {
	return &txtStore{entries: make(map[peer.ID]txtEntry)}
}

func (s *txtStore) set(id peer.ID, value string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entries[id] = txtEntry{value: value, expires: time.Now().Add(challengeTTL)}
}

func (s *txtStore) get(id peer.ID) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[id]
	if !ok {
		return "", false
	}
	if time.Now().After(e.expires) {
		delete(s.entries, id)
		return "", false
	}
	return e.value, true
}
