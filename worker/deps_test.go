package worker

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImportGraph: a service that imports the worker package gets none of
// the master's heavier dependencies (metrics, BPF, packaging, gRPC).
func TestImportGraph(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/gorolling/gorolling/worker").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"github.com/VictoriaMetrics/", "github.com/cilium/", "github.com/prometheus/", "google.golang.org/grpc", "github.com/goreleaser/", "github.com/gorolling/gorolling/master", "github.com/gorolling/gorolling/packaging"} {
			if strings.HasPrefix(dep, banned) {
				t.Errorf("the worker package pulls in %s", dep)
			}
		}
	}
}
