package storage

import (
	"bytes"
	"encoding/json"
	"time"
)

// The content of a lock file, shared with certmagic's FileStorage lock.
//
// certmagic writes {"created":…,"updated":…} when it takes a lock, rewrites
// "updated" every 5 s while it holds it, and considers a lock whose
// "updated" (else "created") is more than 10 s old stale. The flock-based
// lock writes the same fields once, plus "flock":true, which certmagic
// ignores.
const (
	// certmagicStale is how old certmagic's lock must be to be stale: twice
	// its refresh interval.
	certmagicStale = 10 * time.Second
	// clockSkew is how far in the future a lock file may be dated and still
	// be believed: another host's clock may run a little ahead.
	clockSkew = 5 * time.Second
	// maxLockFile bounds how much of a lock file is read; certmagic's are
	// under 100 bytes.
	maxLockFile = 4096
)

// lockMeta is the content of a lock file.
type lockMeta struct {
	Created time.Time `json:"created,omitzero"`
	Updated time.Time `json:"updated,omitzero"`
	// Flock marks a file written by the holder of an OS file lock on it.
	Flock bool `json:"flock,omitzero"`
}

// encodeLock returns the content the flock-based lock writes into its
// file when taken at now.
func encodeLock(now time.Time) []byte {
	b, err := json.Marshal(lockMeta{Created: now, Updated: now, Flock: true})
	if err != nil {
		// Marshal fails only for a time outside years 0 to 9999.
		return []byte("{\"flock\":true}\n")
	}
	return append(b, '\n')
}

// lockState is what the previous content of a lock file says, to a process
// that holds the OS file lock on it.
type lockState int

const (
	// lockFree: nothing in the file says another process holds the lock
	// (no content, a stale date, or a previous flock holder, gone since the
	// OS lock is ours): take it over silently.
	lockFree lockState = iota
	// lockHeld: a process using certmagic's lock holds it, refreshing it
	// within the last 10 s: wait.
	lockHeld
	// lockGarbage: the file holds no lock record (a torn write, say):
	// take it over with a warning.
	lockGarbage
	// lockFuture: the file is dated further in the future than clocks
	// drift (a host with a fast clock wrote it): take it over with a
	// warning rather than wait for that date.
	lockFuture
)

// judgeLock says what content, read from a lock file at now, means; when it
// is dated, at is its date.
func judgeLock(content []byte, now time.Time) (state lockState, at time.Time) {
	if len(bytes.TrimSpace(content)) == 0 {
		return lockFree, time.Time{}
	}
	var meta lockMeta
	if len(content) > maxLockFile || json.Unmarshal(content, &meta) != nil {
		return lockGarbage, time.Time{}
	}
	if meta.Flock {
		return lockFree, time.Time{}
	}
	at = meta.Updated
	if at.IsZero() {
		at = meta.Created
	}
	if at.IsZero() {
		return lockFree, at
	}
	switch age := now.Sub(at); {
	case age < -clockSkew:
		return lockFuture, at
	case age <= certmagicStale:
		return lockHeld, at
	default:
		return lockFree, at
	}
}
