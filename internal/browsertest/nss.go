package browsertest

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// newNSSDB creates home/.pki/nssdb, the NSS database Chromium on Linux
// reads its user trust settings from (sql: format, empty password), and
// adds each certificate of rootsPEM as a CA trusted to issue server
// certificates (trust flags "C,,"). With no roots it creates nothing and
// Chromium starts with an empty database of its own.
func newNSSDB(ctx context.Context, home string, rootsPEM []byte) error {
	db := filepath.Join(home, ".pki", "nssdb")
	if err := os.MkdirAll(db, 0o700); err != nil {
		return err
	}
	if len(rootsPEM) == 0 {
		return nil
	}
	certutil, err := exec.LookPath("certutil")
	if err != nil {
		return errors.New("no certutil to trust the CA root (Debian: apt-get install libnss3-tools)")
	}
	run := func(stdin []byte, args ...string) error {
		cmd := exec.CommandContext(ctx, certutil, append([]string{"-d", "sql:" + db}, args...)...)
		cmd.Stdin = bytes.NewReader(stdin)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("certutil %v: %w: %s", args, err, bytes.TrimSpace(out))
		}
		return nil
	}
	if err := run(nil, "-N", "--empty-password"); err != nil {
		return fmt.Errorf("creating the NSS database: %w", err)
	}
	n := 0
	for rest := rootsPEM; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		n++
		// -a: the certificate on stdin is PEM (ASCII), not DER.
		nick := fmt.Sprintf("browsertest root %d", n)
		if err := run(pem.EncodeToMemory(block), "-A", "-a", "-n", nick, "-t", "C,,"); err != nil {
			return fmt.Errorf("trusting CA root %d: %w", n, err)
		}
	}
	if n == 0 {
		return errors.New("TrustRootPEM holds no PEM certificate")
	}
	return nil
}
