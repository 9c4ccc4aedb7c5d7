package autotls

import (
	"context"
	"log/slog"
)

// debugLogger returns l with every record lowered to debug level. acmez
// logs its requests, and its retries of a CA's 5xx and badNonce at
// warning level; what an operator needs to see is said by the manager
// itself, once per distinct failure.
func debugLogger(l *slog.Logger) *slog.Logger {
	return slog.New(debugHandler{l.Handler()})
}

type debugHandler struct{ h slog.Handler }

func (d debugHandler) Enabled(ctx context.Context, _ slog.Level) bool {
	return d.h.Enabled(ctx, slog.LevelDebug)
}

func (d debugHandler) Handle(ctx context.Context, r slog.Record) error {
	r.Level = slog.LevelDebug
	return d.h.Handle(ctx, r)
}

func (d debugHandler) WithAttrs(as []slog.Attr) slog.Handler { return debugHandler{d.h.WithAttrs(as)} }
func (d debugHandler) WithGroup(name string) slog.Handler    { return debugHandler{d.h.WithGroup(name)} }
