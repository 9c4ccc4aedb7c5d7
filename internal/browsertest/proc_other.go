//go:build !linux

package browsertest

import "errors"

// browser is not implemented outside Linux: there Chromium does not take
// its trust settings from an NSS database, so Dial could not work anyway.
type browser struct {
	stderr *tailBuffer
	done   chan struct{}
	err    error
}

func startBrowser(chromium, dir, home, hostRules, pageURL string) (*browser, error) {
	return nil, errors.New("running chromium is implemented on Linux only")
}

func (b *browser) kill() {}
