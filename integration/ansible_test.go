package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestAnsibleRollout runs the shipped rollout play against this host in
// local mode and a master started here: a good release rolls, and a broken
// one stops the play with the rollback reason while the old generation
// keeps serving.
func TestAnsibleRollout(t *testing.T) {
	playbook := requireTool(t, "ansible-playbook")
	dir := t.TempDir()
	app := filepath.Join(dir, "myapp")
	good, err := os.ReadFile(binPath("example-server"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(app, good, 0o755); err != nil {
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
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--", app, "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	ctl := p.controlPath()
	play, err := filepath.Abs("../packaging/examples/ansible/rollout.yml")
	if err != nil {
		t.Fatal(err)
	}
	run := func(src string) (int, string) {
		t.Helper()
		cmd := exec.Command(playbook, "-i", "localhost,", "-c", "local", play,
			"-e", "rollout_hosts=localhost", "-e", "ansible_python_interpreter=/usr/bin/python3",
			"-e", "release_src="+src, "-e", "release_dest="+app,
			"-e", "gorolling_bin="+binPath("gorolling"), "-e", "gorolling_control="+ctl)
		tmp := t.TempDir()
		cmd.Env = append(os.Environ(), "ANSIBLE_NOCOLOR=1", "ANSIBLE_LOCAL_TEMP="+tmp, "ANSIBLE_REMOTE_TEMP="+tmp, "ANSIBLE_HOME="+tmp, "ANSIBLE_RETRY_FILES_ENABLED=0")
		out, _ := cmd.CombinedOutput()
		return cmd.ProcessState.ExitCode(), string(out)
	}
	generation := func() int { return int(statusOf(t, ctl)["generation"].(float64)) }

	code, out := run(goodSrc)
	if code != 0 {
		t.Fatalf("the good release: ansible-playbook exit %d\n%s", code, out)
	}
	if g := generation(); g != 2 {
		t.Fatalf("after the good release generation %d serves, want 2", g)
	}

	code, out = run(badSrc)
	if code == 0 {
		t.Fatalf("the broken release: the play succeeded\n%s", out)
	}
	if !strings.Contains(out, "rolled the upgrade back") || !strings.Contains(out, "exit status 1") {
		t.Errorf("the play's failure does not give the rollback reason:\n%s", out)
	}
	if g := generation(); g != 2 {
		t.Errorf("after the broken release generation %d serves, want the old 2", g)
	}
	waitHTTP(t, addr, 5*time.Second)
	// The previous release is back on disk, for the old generation's
	// respawns.
	if b, err := os.ReadFile(app); err != nil || len(b) != len(good) {
		t.Errorf("after the rollback the program on disk has %d bytes (%v), want the good release's %d", len(b), err, len(good))
	}
	t.Logf("broken release: ansible-playbook exit %d; generation 2 still serves", code)
}
