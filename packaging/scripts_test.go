package main

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// scriptSandbox is a directory tree the maintainer scripts run against:
// stub gorolling and systemctl commands that log their arguments, a run
// directory with control sockets, an optional /run/systemd/system and
// the links "systemctl enable" makes.
type scriptSandbox struct {
	t     *testing.T
	dir   string
	paths scriptPaths
	log   string
	path  string // PATH for the scripts: the stubs first
}

func newScriptSandbox(t *testing.T, systemd, systemctlFails bool) *scriptSandbox {
	t.Helper()
	dir := t.TempDir()
	s := &scriptSandbox{t: t, dir: dir, log: filepath.Join(dir, "calls.log")}
	s.paths = scriptPaths{
		bin:            filepath.Join(dir, "bin", "gorolling"),
		runDir:         filepath.Join(dir, "run", "gorolling"),
		systemdRunDir:  filepath.Join(dir, "run", "systemd", "system"),
		systemdConfDir: filepath.Join(dir, "etc", "systemd", "system"),
		upgradeTimeout: 10,
	}
	stubs := filepath.Join(dir, "stubs")
	for _, d := range []string{filepath.Dir(s.paths.bin), s.paths.runDir, stubs,
		filepath.Join(s.paths.systemdConfDir, "multi-user.target.wants")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if systemd {
		if err := os.MkdirAll(s.paths.systemdRunDir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	systemctlExit := "0"
	if systemctlFails {
		systemctlExit = "1"
	}
	// The gorolling stub fails for the master behind fail.sock, as a
	// master that cannot be upgraded (or an old binary) would.
	writeExec(t, s.paths.bin, `#!/bin/sh
echo "gorolling $*" >>`+shQuote(s.log)+`
case "$*" in *fail.sock*) echo "upgrade failed" >&2; exit 1 ;; esac
exit 0
`)
	writeExec(t, filepath.Join(stubs, "systemctl"), `#!/bin/sh
echo "systemctl $*" >>`+shQuote(s.log)+`
exit `+systemctlExit+`
`)
	s.path = stubs + ":" + os.Getenv("PATH")

	// Two masters (a live one and one whose upgrade fails), and files that
	// are not sockets, which must be skipped.
	for _, name := range []string{"a.sock", "fail.sock"} {
		l, err := net.Listen("unix", filepath.Join(s.paths.runDir, name))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
	}
	for _, name := range []string{"plain.sock", "notes.txt"} {
		if err := os.WriteFile(filepath.Join(s.paths.runDir, name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// Enabled instances: one whose template is gone, one pointing to a
	// file that exists, and another package's dangling link.
	wants := filepath.Join(s.paths.systemdConfDir, "multi-user.target.wants")
	kept := filepath.Join(dir, "kept@.service")
	if err := os.WriteFile(kept, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for name, target := range map[string]string{
		"gorolling@a.service": filepath.Join(dir, "gone", "gorolling@.service"),
		"gorolling@b.service": kept,
		"other@a.service":     filepath.Join(dir, "gone", "other@.service"),
	} {
		if err := os.Symlink(target, filepath.Join(wants, name)); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func writeExec(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o755); err != nil {
		t.Fatal(err)
	}
}

// run renders one maintainer script for the sandbox and runs it with sh.
func (s *scriptSandbox) run(format, name string, args ...string) (calls []string, stderr string, err error) {
	s.t.Helper()
	script, err := renderScript(format, name, s.paths)
	if err != nil {
		s.t.Fatal(err)
	}
	path := filepath.Join(s.dir, format+"-"+name)
	writeExec(s.t, path, string(script))
	os.Remove(s.log)
	cmd := exec.Command("sh", append([]string{path}, args...)...)
	cmd.Env = append(os.Environ(), "PATH="+s.path)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		s.t.Fatalf("%s %s %v: no exit within 30s", format, name, args)
	}
	b, _ := os.ReadFile(s.log)
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l != "" {
			calls = append(calls, strings.ReplaceAll(l, s.paths.runDir+"/", "RUN/"))
		}
	}
	return calls, errb.String(), err
}

func (s *scriptSandbox) linkExists(name string) bool {
	_, err := os.Lstat(filepath.Join(s.paths.systemdConfDir, "multi-user.target.wants", name))
	return err == nil
}

// TestMaintainerScripts runs every maintainer script with the arguments
// dpkg and rpm pass, with and without systemd, against stubs.
func TestMaintainerScripts(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Fatalf("sh not found: %v", err)
	}
	const (
		reload  = "systemctl daemon-reload"
		stop    = "systemctl stop gorolling@*.service"
		upA     = "gorolling upgrade --master --wait --control RUN/a.sock"
		upFail  = "gorolling upgrade --master --wait --control RUN/fail.sock"
		warning = "the master behind"
	)
	for _, tc := range []struct {
		name           string
		format, script string
		args           []string
		systemd        bool
		systemctlFails bool
		wantCalls      []string
		wantExit       int
		wantStderr     string // "" for no check
		wantForgotten  bool   // the dangling gorolling@a link is removed
	}{
		{name: "deb install", format: "deb", script: "postinst", args: []string{"configure", ""}, systemd: true, wantCalls: []string{reload}},
		{name: "deb install no systemd", format: "deb", script: "postinst", args: []string{"configure", ""}},
		{name: "deb install no second arg", format: "deb", script: "postinst", args: []string{"configure"}, systemd: true, wantCalls: []string{reload}},
		{name: "deb upgrade", format: "deb", script: "postinst", args: []string{"configure", "0.1.0"}, systemd: true,
			wantCalls: []string{upA, upFail, reload}, wantStderr: warning},
		{name: "deb upgrade no systemd", format: "deb", script: "postinst", args: []string{"configure", "0.1.0"},
			wantCalls: []string{upA, upFail}, wantStderr: warning},
		{name: "deb upgrade systemctl fails", format: "deb", script: "postinst", args: []string{"configure", "0.1.0"}, systemd: true, systemctlFails: true,
			wantCalls: []string{upA, upFail, reload}, wantStderr: "daemon-reload failed"},
		{name: "deb abort-upgrade", format: "deb", script: "postinst", args: []string{"abort-upgrade", "0.2.0"}, systemd: true, wantCalls: []string{reload}},
		{name: "deb postinst bad argument", format: "deb", script: "postinst", args: []string{"frobnicate"}, wantExit: 1, wantStderr: "unknown argument"},
		{name: "deb remove stops units", format: "deb", script: "prerm", args: []string{"remove"}, systemd: true, wantCalls: []string{stop}},
		{name: "deb remove stop fails", format: "deb", script: "prerm", args: []string{"remove"}, systemd: true, systemctlFails: true,
			wantCalls: []string{stop}, wantStderr: "could not stop"},
		{name: "deb remove no systemd", format: "deb", script: "prerm", args: []string{"remove"}},
		{name: "deb prerm upgrade", format: "deb", script: "prerm", args: []string{"upgrade", "0.2.0"}, systemd: true},
		{name: "deb postrm remove", format: "deb", script: "postrm", args: []string{"remove"}, systemd: true, wantCalls: []string{reload}},
		{name: "deb postrm remove no systemd", format: "deb", script: "postrm", args: []string{"remove"}},
		{name: "deb purge", format: "deb", script: "postrm", args: []string{"purge"}, systemd: true, wantCalls: []string{reload}, wantForgotten: true},
		{name: "deb purge no systemd", format: "deb", script: "postrm", args: []string{"purge"}, wantForgotten: true},
		{name: "deb postrm upgrade", format: "deb", script: "postrm", args: []string{"upgrade", "0.2.0"}, systemd: true},
		{name: "rpm install", format: "rpm", script: "post", args: []string{"1"}, systemd: true, wantCalls: []string{reload}},
		{name: "rpm install no systemd", format: "rpm", script: "post", args: []string{"1"}},
		{name: "rpm upgrade", format: "rpm", script: "post", args: []string{"2"}, systemd: true,
			wantCalls: []string{upA, upFail, reload}, wantStderr: warning},
		{name: "rpm upgrade no systemd", format: "rpm", script: "post", args: []string{"2"},
			wantCalls: []string{upA, upFail}, wantStderr: warning},
		{name: "rpm erase stops units", format: "rpm", script: "preun", args: []string{"0"}, systemd: true, wantCalls: []string{stop}},
		{name: "rpm erase no systemd", format: "rpm", script: "preun", args: []string{"0"}},
		{name: "rpm preun upgrade", format: "rpm", script: "preun", args: []string{"1"}, systemd: true},
		{name: "rpm postun erase", format: "rpm", script: "postun", args: []string{"0"}, systemd: true, wantCalls: []string{reload}, wantForgotten: true},
		{name: "rpm postun upgrade", format: "rpm", script: "postun", args: []string{"1"}, systemd: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newScriptSandbox(t, tc.systemd, tc.systemctlFails)
			calls, stderr, err := s.run(tc.format, tc.script, tc.args...)
			exit := 0
			if ee, ok := err.(*exec.ExitError); ok {
				exit = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if exit != tc.wantExit {
				t.Errorf("exit %d, want %d (stderr %q)", exit, tc.wantExit, stderr)
			}
			if !slices.Equal(calls, tc.wantCalls) {
				t.Errorf("calls:\n  %s\nwant:\n  %s", strings.Join(calls, "\n  "), strings.Join(tc.wantCalls, "\n  "))
			}
			if tc.wantStderr != "" && !strings.Contains(stderr, tc.wantStderr) {
				t.Errorf("stderr %q, want it to contain %q", stderr, tc.wantStderr)
			}
			if got := !s.linkExists("gorolling@a.service"); got != tc.wantForgotten {
				t.Errorf("dangling gorolling@a link removed: %v, want %v", got, tc.wantForgotten)
			}
			if !s.linkExists("gorolling@b.service") || !s.linkExists("other@a.service") {
				t.Error("a link that is not a dangling gorolling@ one was removed")
			}
		})
	}
}

// TestRenderScript checks the rendered scripts are complete sh programs.
func TestRenderScript(t *testing.T) {
	for format, names := range scriptNames {
		for _, name := range names {
			b, err := renderScript(format, name, installedPaths)
			if err != nil {
				t.Fatal(err)
			}
			s := string(b)
			if !strings.HasPrefix(s, "#!/bin/sh\n") || !strings.Contains(s, "\nset -e\n") {
				t.Errorf("%s %s: no #!/bin/sh and set -e header", format, name)
			}
			if strings.Contains(s, "@") && placeholderRE.MatchString(s) {
				t.Errorf("%s %s: placeholder left", format, name)
			}
			cmd := exec.Command("sh", "-n")
			cmd.Stdin = strings.NewReader(s)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s %s: sh -n: %v\n%s", format, name, err, out)
			}
		}
	}
	if _, err := renderScript("deb", "nonexistent", installedPaths); err == nil {
		t.Error("rendering a missing script succeeded")
	}
}

var regexpCache sync.Map

// regexpMust compiles a test's regular expression once.
func regexpMust(re string) *regexp.Regexp {
	if r, ok := regexpCache.Load(re); ok {
		return r.(*regexp.Regexp)
	}
	r := regexp.MustCompile(re)
	regexpCache.Store(re, r)
	return r
}
