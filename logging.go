package autotls

import (
	"context"
	"log/slog"

	"go.uber.org/zap/zapcore"
)

// certmagic logs through zap and acmez at info level on the happy path.
// Both are routed into our slog logger at debug level: what an operator
// needs to see is logged by the manager itself, once per event.

// quietLogger returns l with every record below warning level lowered to
// debug.
func quietLogger(l *slog.Logger) *slog.Logger {
	return slog.New(quietHandler{l.Handler()})
}

type quietHandler struct{ h slog.Handler }

func (q quietHandler) Enabled(ctx context.Context, lvl slog.Level) bool {
	return q.h.Enabled(ctx, quiet(lvl))
}

func (q quietHandler) Handle(ctx context.Context, r slog.Record) error {
	r.Level = quiet(r.Level)
	return q.h.Handle(ctx, r)
}

func (q quietHandler) WithAttrs(as []slog.Attr) slog.Handler { return quietHandler{q.h.WithAttrs(as)} }
func (q quietHandler) WithGroup(name string) slog.Handler    { return quietHandler{q.h.WithGroup(name)} }

func quiet(l slog.Level) slog.Level {
	if l < slog.LevelWarn {
		return slog.LevelDebug
	}
	return l
}

// slogCore is a zapcore.Core writing to slog at debug level.
type slogCore struct {
	l      *slog.Logger
	fields []zapcore.Field
}

func newSlogCore(l *slog.Logger) zapcore.Core { return &slogCore{l: l} }

func (c *slogCore) Enabled(zapcore.Level) bool {
	return c.l.Enabled(context.Background(), slog.LevelDebug)
}

func (c *slogCore) With(fs []zapcore.Field) zapcore.Core {
	return &slogCore{l: c.l, fields: append(append([]zapcore.Field(nil), c.fields...), fs...)}
}

func (c *slogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *slogCore) Write(e zapcore.Entry, fs []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fs {
		f.AddTo(enc)
	}
	attrs := make([]slog.Attr, 0, len(enc.Fields)+1)
	if e.LoggerName != "" {
		attrs = append(attrs, slog.String("logger", e.LoggerName))
	}
	for k, v := range enc.Fields {
		attrs = append(attrs, slog.Any(k, v))
	}
	c.l.LogAttrs(context.Background(), slog.LevelDebug, e.Message, attrs...)
	return nil
}

func (c *slogCore) Sync() error { return nil }
