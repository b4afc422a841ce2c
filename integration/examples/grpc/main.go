// Command grpc-example is a gRPC server that runs under gorolling: it gets
// its listener from worker.Listen (shared by every worker and generation),
// serves the standard health service (grpc.health.v1, whose Check is a
// plain unary RPC), says it is ready, and on drain stops with
// GracefulStop: HTTP/2 GOAWAY tells clients to open a new connection
// (which the next generation accepts on the same socket) while the RPCs in
// flight finish.
//
// It lives in a module of its own so that gRPC is no requirement of the
// main module.
package main

import (
	"flag"
	"log"

	"github.com/gorolling/gorolling/worker"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func main() {
	addr := flag.String("listen", "127.0.0.1:50051", "address to serve gRPC on")
	flag.Parse()
	l, err := worker.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	worker.HandleSignals()
	go func() {
		<-worker.Draining()
		// No hs.Shutdown(): the service goes on serving (the next
		// generation accepts on the same socket), so a health check must
		// not say NOT_SERVING. GracefulStop sends GOAWAY, refuses new
		// streams on this worker's connections and waits for the ones in
		// flight.
		srv.GracefulStop()
	}()
	if err := worker.Ready(); err != nil {
		log.Fatal(err)
	}
	// A drain that comes before Serve has started makes it return
	// ErrServerStopped: that too is a clean stop.
	if err := srv.Serve(l); err != nil && err != grpc.ErrServerStopped {
		log.Fatal(err)
	}
}
