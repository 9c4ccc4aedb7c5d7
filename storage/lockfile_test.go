package storage

import (
	"bytes"
	"encoding/json"
	"fmt"
	"testing"
	"time"
)

// certmagicLock returns the content certmagic's FileStorage writes into a
// lock file it took at created and last refreshed at updated.
func certmagicLock(created, updated time.Time) []byte {
	return fmt.Appendf(nil, "{\"created\":%q,\"updated\":%q}\n", created.Format(time.RFC3339Nano), updated.Format(time.RFC3339Nano))
}

func TestJudgeLock(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	ago := func(d time.Duration) time.Time { return now.Add(-d) }
	tests := []struct {
		name    string
		content []byte
		want    lockState
	}{
		{"absent or empty", nil, lockFree},
		{"blank", []byte(" \n"), lockFree},
		{"certmagic fresh", certmagicLock(ago(time.Minute), ago(time.Second)), lockHeld},
		{"certmagic just taken", certmagicLock(now, now), lockHeld},
		{"certmagic at the stale limit", certmagicLock(ago(time.Minute), ago(certmagicStale)), lockHeld},
		{"certmagic stale", certmagicLock(ago(time.Minute), ago(certmagicStale+time.Millisecond)), lockFree},
		{"certmagic long dead", certmagicLock(ago(time.Hour), ago(time.Hour)), lockFree},
		{"created only, fresh", fmt.Appendf(nil, `{"created":%q}`, ago(time.Second).Format(time.RFC3339)), lockHeld},
		{"created only, stale", fmt.Appendf(nil, `{"created":%q}`, ago(time.Minute).Format(time.RFC3339)), lockFree},
		{"fresh update, old creation", fmt.Appendf(nil, `{"created":%q,"updated":%q}`, ago(time.Hour).Format(time.RFC3339), ago(time.Second).Format(time.RFC3339)), lockHeld},
		{"clock a little ahead", certmagicLock(now.Add(clockSkew), now.Add(clockSkew)), lockHeld},
		{"dated in the future", certmagicLock(now.Add(time.Hour), now.Add(time.Hour)), lockFuture},
		{"just past the skew", certmagicLock(now, now.Add(clockSkew+time.Millisecond)), lockFuture},
		{"undated", []byte(`{}`), lockFree},
		{"null", []byte(`null`), lockFree},
		{"unknown fields", fmt.Appendf(nil, `{"updated":%q,"pid":42}`, now.Format(time.RFC3339)), lockHeld},
		{"ours, fresh", encodeLock(now), lockFree},
		{"ours, in the future", encodeLock(now.Add(time.Hour)), lockFree},
		{"torn write", []byte(`{"created":"2026-11-23T11:59:`), lockGarbage},
		{"bad date", []byte(`{"updated":"yesterday"}`), lockGarbage},
		{"not an object", []byte(`["x"]`), lockGarbage},
		{"binary", []byte{0, 0xff, 0x13, 0x37}, lockGarbage},
		{"two records", append(certmagicLock(now, now), certmagicLock(now, now)...), lockGarbage},
		{"too long", append(append([]byte(`{"x":"`), bytes.Repeat([]byte("a"), maxLockFile)...), `"}`...), lockGarbage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, _ := judgeLock(tt.content, now); got != tt.want {
				t.Errorf("judgeLock(%q) = %v, want %v", tt.content, got, tt.want)
			}
		})
	}
}

func TestEncodeLock(t *testing.T) {
	now := time.Now()
	var meta lockMeta
	if err := json.Unmarshal(encodeLock(now), &meta); err != nil {
		t.Fatalf("our lock file content does not decode: %v", err)
	}
	if !meta.Flock || !meta.Created.Equal(now) || !meta.Updated.Equal(now) {
		t.Errorf("lock file content = %+v, want created and updated %v and flock", meta, now)
	}
	// certmagic decodes it into its own struct, with these two fields, and
	// finds it fresh.
	var theirs struct{ Created, Updated time.Time }
	if err := json.Unmarshal(encodeLock(now), &theirs); err != nil || !theirs.Updated.Equal(now) {
		t.Errorf("certmagic would read %+v, %v", theirs, err)
	}
}

func FuzzJudgeLock(f *testing.F) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	f.Add([]byte(nil))
	f.Add(certmagicLock(now, now))
	f.Add(encodeLock(now))
	f.Add([]byte(`{"created":"2026-11-23T11:59:`))
	f.Fuzz(func(t *testing.T, content []byte) {
		state, at := judgeLock(content, now)
		switch state {
		case lockFree:
		case lockHeld:
			if at.Before(now.Add(-certmagicStale)) || at.After(now.Add(clockSkew)) {
				t.Errorf("held, dated %v: outside the window", at)
			}
		case lockFuture:
			if !at.After(now.Add(clockSkew)) {
				t.Errorf("dated in the future at %v", at)
			}
		case lockGarbage:
			if json.Valid(content) && len(content) <= maxLockFile {
				var meta lockMeta
				if json.Unmarshal(content, &meta) == nil {
					t.Errorf("garbage, yet it decodes to %+v", meta)
				}
			}
		default:
			t.Fatalf("unknown state %v", state)
		}
	})
}
