package testforge

import (
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mholt/acmez/v3/acme"
)

// TestProfiles: Pebble's directory lists the profiles of Config.Profiles,
// or the two default ones when it is nil; an empty map is refused (Pebble
// would panic on an order that names no profile).
func TestProfiles(t *testing.T) {
	for _, tc := range []struct {
		name     string
		profiles map[string]time.Duration
		want     []string
	}{
		{"nil: the defaults", nil, []string{"default", "shortlived"}},
		{"configured", map[string]time.Duration{"classic": 90 * 24 * time.Hour, "shortlived": 6 * 24 * time.Hour, "minutes": 0}, []string{"classic", "minutes", "shortlived"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := New(t, Config{Profiles: tc.profiles})
			hc := f.CAClient()
			defer hc.CloseIdleConnections()
			resp, err := hc.Get(f.CAURL)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var dir acme.Directory
			if err := json.NewDecoder(resp.Body).Decode(&dir); err != nil {
				t.Fatal(err)
			}
			if dir.Meta == nil {
				t.Fatal("the directory has no meta")
			}
			if got := slices.Sorted(maps.Keys(dir.Meta.Profiles)); !slices.Equal(got, tc.want) {
				t.Fatalf("profiles %v, want %v", got, tc.want)
			}
		})
	}
	if _, err := Start(Config{Profiles: map[string]time.Duration{}}); err == nil || !strings.Contains(err.Error(), "Profiles") {
		t.Fatalf("an empty Profiles map: err %v, want it refused", err)
	}
}
