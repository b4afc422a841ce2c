package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// build compiles gorolling (in the main module, three directories up) and
// this example into dir.
func build(t *testing.T, dir string) (gorolling, server string) {
	t.Helper()
	gorolling, server = filepath.Join(dir, "gorolling"), filepath.Join(dir, "grpc-example")
	for _, b := range []struct{ dir, pkg, out string }{{"../../..", "./cmd/gorolling", gorolling}, {".", ".", server}} {
		cmd := exec.Command("go", "build", "-o", b.out, b.pkg)
		cmd.Dir = b.dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", b.pkg, err, out)
		}
	}
	return gorolling, server
}

type status struct {
	PID        int `json:"pid"`
	Generation int `json:"generation"`
	Processes  []struct {
		Generation int    `json:"generation"`
		State      string `json:"state"`
	} `json:"processes"`
	Listeners []struct {
		Address string `json:"address"`
	} `json:"listeners"`
}

// TestGRPCThroughUpgrades: a real grpc-go client with retries disabled
// issues unary RPCs from 16 goroutines over 4 connections while the master
// rolls its workers 10 times and replaces itself once. Every RPC succeeds.
func TestGRPCThroughUpgrades(t *testing.T) {
	dir := t.TempDir()
	gorolling, server := build(t, dir)
	ctlDir := filepath.Join(dir, "ctl")
	if err := os.Mkdir(ctlDir, 0o700); err != nil {
		t.Fatal(err)
	}
	ctl := filepath.Join(ctlDir, "grpc.sock")
	pidFile := filepath.Join(dir, "master.pid")
	master := exec.Command(gorolling, "exec", "--control", ctl, "--pid-file", pidFile, "-w", "2", "--", server, "-listen", "127.0.0.1:0")
	logPath := filepath.Join(dir, "master.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	master.Stdout, master.Stderr = logf, logf
	if err := master.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			lines := strings.Split(string(b), "\n")
			if len(lines) > 60 {
				lines = lines[len(lines)-60:]
			}
			t.Logf("master log (last lines):\n%s", strings.Join(lines, "\n"))
		}
	})
	exited := make(chan struct{})
	go func() { master.Wait(); close(exited) }()
	t.Cleanup(func() {
		// Whichever master serves now (after the self-upgrade it is not
		// the one started here) drains and exits.
		exec.Command(gorolling, "stop", "--control", ctl).Run()
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			master.Process.Kill()
		}
	})
	ctlCmd := func(args ...string) ([]byte, error) {
		return exec.Command(gorolling, append(args, "--control", ctl)...).Output()
	}
	statusNow := func() (*status, error) {
		out, err := ctlCmd("status", "--json")
		if err != nil {
			return nil, err
		}
		var st status
		return &st, json.Unmarshal(out, &st)
	}
	var st *status
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		s, err := statusNow()
		if err == nil && s.Generation > 0 && len(s.Listeners) > 0 {
			st = s
			break
		}
		if time.Now().After(end) {
			t.Fatalf("the master did not serve: %v", err)
		}
	}
	addr := st.Listeners[0].Address

	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for c := 0; c < 4; c++ {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDisableRetry())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		client := healthpb.NewHealthClient(conn)
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					// The deadline is the bound on one RPC: slower
					// counts as a failure.
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
					resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
					cancel()
					if err == nil && resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
						err = fmt.Errorf("status %s", resp.GetStatus())
					}
					if err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
					} else {
						ok.Add(1)
					}
				}
			}()
		}
	}
	time.Sleep(300 * time.Millisecond)
	for i := 0; i < 10; i++ {
		if out, err := ctlCmd("upgrade", "--wait", "--workers"); err != nil {
			t.Fatalf("upgrade %d: %v %s", i+1, err, out)
		}
		time.Sleep(300 * time.Millisecond)
	}
	old := st.PID
	if out, err := ctlCmd("upgrade", "--wait", "--master"); err != nil {
		t.Fatalf("master upgrade: %v %s", err, out)
	}
	// The old master drains its workers and exits.
	for end := time.Now().Add(60 * time.Second); syscall.Kill(old, 0) == nil; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("the old master %d did not exit", old)
		}
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	b, _ := os.ReadFile(pidFile)
	newPID, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	t.Logf("grpc-go client (retries disabled) through 10 HUPs and a master upgrade (pid %d -> %d): %d unary RPCs ok, %d failed", old, newPID, ok.Load(), failed.Load())
	if failed.Load() > 0 {
		t.Errorf("%d RPCs failed; the first: %v", failed.Load(), firstErr.Load())
	}
	if ok.Load() < 1000 {
		t.Errorf("only %d RPCs answered", ok.Load())
	}
	if newPID == old || newPID == 0 {
		t.Errorf("the pid file names %d after the master upgrade (old %d)", newPID, old)
	}
}
