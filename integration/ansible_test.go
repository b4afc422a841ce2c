package integration

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestAnsibleRollout runs the shipped rollout play in local mode against
// two hosts of an inventory, each a master started here with its own
// release file: a good release rolls on both; a broken one rolls back on
// the first host, stops the play there with the rollback reason while that
// host's old generation keeps serving, and never reaches the second.
func TestAnsibleRollout(t *testing.T) {
	playbook := requireTool(t, "ansible-playbook")
	dir := t.TempDir()
	good, err := os.ReadFile(binPath("example-server"))
	if err != nil {
		t.Fatal(err)
	}
	goodSrc := filepath.Join(dir, "release-good")
	badSrc := filepath.Join(dir, "release-broken")
	if err := os.WriteFile(goodSrc, good, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(badSrc, []byte("#!/bin/sh\necho 'cannot open config' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	type host struct {
		name, app, ctl, addr string
	}
	var hosts []host
	var inventory strings.Builder
	inventory.WriteString("[app]\n")
	for _, name := range []string{"host1", "host2"} {
		app := filepath.Join(dir, name, "myapp")
		if err := os.MkdirAll(filepath.Dir(app), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(app, good, 0o755); err != nil {
			t.Fatal(err)
		}
		p := startMaster(t, masterOpts{args: []string{"-w", "2", "--", app, "-listen", "127.0.0.1:0"}})
		p.waitServing()
		h := host{name: name, app: app, ctl: p.controlPath(), addr: p.listenAddr(5 * time.Second)}
		hosts = append(hosts, h)
		fmt.Fprintf(&inventory, "%s ansible_connection=local ansible_python_interpreter=/usr/bin/python3 release_dest=%s gorolling_control=%s\n", name, h.app, h.ctl)
	}
	inv := filepath.Join(dir, "inventory")
	if err := os.WriteFile(inv, []byte(inventory.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	play, err := filepath.Abs("../packaging/examples/ansible/rollout.yml")
	if err != nil {
		t.Fatal(err)
	}
	run := func(src string) (int, string) {
		t.Helper()
		cmd := exec.Command(playbook, "-i", inv, play,
			"-e", "release_src="+src, "-e", "gorolling_bin="+binPath("gorolling"))
		tmp := t.TempDir()
		cmd.Env = append(os.Environ(), "ANSIBLE_NOCOLOR=1", "ANSIBLE_LOCAL_TEMP="+tmp, "ANSIBLE_REMOTE_TEMP="+tmp, "ANSIBLE_HOME="+tmp, "ANSIBLE_RETRY_FILES_ENABLED=0")
		out, _ := cmd.CombinedOutput()
		return cmd.ProcessState.ExitCode(), string(out)
	}
	generation := func(h host) int { return int(statusOf(t, h.ctl)["generation"].(float64)) }

	code, out := run(goodSrc)
	if code != 0 {
		t.Fatalf("the good release: ansible-playbook exit %d\n%s", code, out)
	}
	for _, h := range hosts {
		if g := generation(h); g != 2 {
			t.Fatalf("after the good release generation %d serves on %s, want 2", g, h.name)
		}
	}
	// The second host's file: the broken release must never reach it.
	marked := append(append([]byte{}, good...), []byte("host2")...)
	replaceFile(t, hosts[1].app, marked)

	code, out = run(badSrc)
	if code == 0 {
		t.Fatalf("the broken release: the play succeeded\n%s", out)
	}
	if !strings.Contains(out, "rolled the upgrade back on host1") || !strings.Contains(out, "exit status 1") {
		t.Errorf("the play's failure does not give host1's rollback reason:\n%s", out)
	}
	if g := generation(hosts[0]); g != 2 {
		t.Errorf("after the broken release generation %d serves on host1, want the old 2", g)
	}
	waitHTTP(t, hosts[0].addr, 5*time.Second)
	// The previous release is back on host1's disk, for the old
	// generation's respawns.
	if b, err := os.ReadFile(hosts[0].app); err != nil || len(b) != len(good) {
		t.Errorf("after the rollback host1's program on disk has %d bytes (%v), want the good release's %d", len(b), err, len(good))
	}
	// The rollout stopped at host1: host2 kept its file and generation.
	if b, err := os.ReadFile(hosts[1].app); err != nil || !bytes.Equal(b, marked) {
		t.Errorf("host2's release file changed (%d bytes, %v): the rollout went on past the rollback", len(b), err)
	}
	if g := generation(hosts[1]); g != 2 {
		t.Errorf("host2 serves generation %d, want 2: the rollout went on past the rollback", g)
	}
	t.Logf("broken release: ansible-playbook exit %d; host1's generation 2 still serves, host2 untouched", code)
}
