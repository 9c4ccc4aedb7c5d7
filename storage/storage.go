// Package storage provides [certmagic.Storage] constructors for autotls: the
// default on-disk store in a per-user data directory ([Default]), a store in
// a directory of your choice ([Dir]), and an in-memory store ([Memory]).
//
// Keep storage persistent. A host that forgets its certificate asks for a new
// one at its next start, and Let's Encrypt issues at most 5 certificates per
// exact set of names per week; every PeerID has its own name, so a host that
// restarts with empty storage more often than that is locked out for days.
// [Memory] is for tests and short-lived processes only.
//
// Any other [certmagic.Storage] works too (a shared database for a cluster of
// hosts with the same identity, for instance): pass it to autotls.WithStorage.
package storage

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/caddyserver/certmagic"
)

// dirName is the directory autotls uses inside the per-user data directory.
const dirName = "autotls"

// DefaultDir returns the absolute directory [Default] stores in:
//
//   - Linux, the BSDs and other Unix: $XDG_DATA_HOME/autotls if
//     $XDG_DATA_HOME is set to an absolute path, else
//     $HOME/.local/share/autotls;
//   - macOS: ~/Library/Application Support/autotls ([os.UserConfigDir]);
//   - Windows: %LocalAppData%\autotls, else %AppData%\autotls;
//   - elsewhere: [os.UserConfigDir]/autotls.
//
// It returns an error if no absolute per-user directory can be determined
// (in a container without $HOME, say); pass autotls.WithStorage then.
// DefaultDir only computes the path; it does not create it.
func DefaultDir() (string, error) {
	return defaultDir(runtime.GOOS, os.Getenv, os.UserConfigDir)
}

// defaultDir is [DefaultDir] with the operating system, the environment and
// [os.UserConfigDir] injected, so that every branch can be tested anywhere.
func defaultDir(goos string, getenv func(string) string, userConfigDir func() (string, error)) (string, error) {
	base, err := dataHome(goos, getenv, userConfigDir)
	if err == nil && !filepath.IsAbs(base) {
		err = fmt.Errorf("%q is not an absolute path", base)
	}
	if err != nil {
		return "", fmt.Errorf("storage: finding the per-user data directory: %w; pass autotls.WithStorage with storage.Dir(path) or another certmagic.Storage", err)
	}
	return filepath.Join(base, dirName), nil
}

// dataHome returns the per-user data directory of the platform, or an error
// saying what is missing.
func dataHome(goos string, getenv func(string) string, userConfigDir func() (string, error)) (string, error) {
	switch goos {
	case "windows":
		if d := getenv("LocalAppData"); d != "" {
			return d, nil
		}
		return userConfigDir()
	case "darwin", "ios", "plan9", "js", "wasip1":
		return userConfigDir()
	}
	// The XDG base directory spec says to ignore a relative $XDG_DATA_HOME.
	if d := getenv("XDG_DATA_HOME"); d != "" && filepath.IsAbs(d) {
		return d, nil
	}
	home := getenv("HOME")
	if home == "" {
		return "", errors.New("neither $XDG_DATA_HOME nor $HOME is set")
	}
	return filepath.Join(home, ".local", "share"), nil
}

// Default returns the on-disk store in [DefaultDir], creating the directory
// if needed, configured by opts as [Dir] is. It is what autotls uses when no
// storage is given.
func Default(opts ...DirOption) (certmagic.Storage, error) {
	dir, err := DefaultDir()
	if err != nil {
		return nil, err
	}
	return Dir(dir, opts...)
}
