package postgres_test

import (
	"context"
	"log"
	"os"

	"github.com/p2ptls/autotls/storage/postgres"
)

// Every host of a fleet opens the same database; the first one creates the
// tables. Pass the storage to autotls.WithStorage, and close it after the
// host.
func ExampleNew() {
	ctx := context.Background()
	certs, err := postgres.New(ctx, os.Getenv("DATABASE_URL"), postgres.WithSchema("autotls"))
	if err != nil {
		log.Fatal(err)
	}
	defer certs.Close()
	_ = certs // autotls.Option(autotls.WithStorage(certs))
}
