package autotlstest

import "testing"

// BenchmarkNew reports the cost of a kit forge's whole lifecycle: CA, CA
// proxy, broker and DNS started, then stopped.
func BenchmarkNew(b *testing.B) {
	for b.Loop() {
		f, err := start(b, config{waitTimeout: DefaultWaitTimeout})
		if err != nil {
			b.Fatal(err)
		}
		f.close()
	}
}
