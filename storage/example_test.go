package storage_test

import (
	"context"
	"fmt"
	"log"

	"github.com/p2ptls/autotls/storage"
)

// A host keeps its certificate in a directory of its own; pass the store to
// autotls.WithStorage. Without WithStorage, autotls uses [storage.Default].
func ExampleDir() {
	certs, err := storage.Dir("/var/lib/mynode/autotls")
	if err != nil {
		log.Fatal(err)
	}
	_ = certs // autotls.Option(autotls.WithStorage(certs))
}

// An in-memory store suits tests; a host using it outside tests asks for a
// new certificate at every start and soon hits the CA's rate limit.
func ExampleMemory() {
	ctx := context.Background()
	s := storage.Memory()
	if err := s.Store(ctx, "certificates/ca/site/site.crt", []byte("PEM")); err != nil {
		log.Fatal(err)
	}
	keys, err := s.List(ctx, "certificates", true)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(keys)
	// Output: [certificates/ca certificates/ca/site certificates/ca/site/site.crt]
}
