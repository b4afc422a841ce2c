package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The tests build three versions. versionB upgrades versionA; versionRC,
// versionB's release candidate, sits between them: package version
// 0.2.0~rc.1 must sort after 0.1.0 and before 0.2.0.
const (
	versionA  = "0.1.0"
	versionRC = "0.2.0-rc.1"
	versionB  = "0.2.0"
)

// workDir holds what the tests build; TestMain removes it.
var workDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "gorolling-packaging-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "create the test directory:", err)
		os.Exit(1)
	}
	workDir = dir
	statInputs()
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// statInputs stats every file of the repository. The packages are built
// from them by a child "go build", which go test's result cache does not
// see; a test process that stats them makes a change to any of them
// invalidate a cached result.
func statInputs() {
	filepath.WalkDir("..", func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "dist") {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			os.Stat(path)
		}
		return nil
	})
}

// ciMode reports whether GOROLLING_CI is set: then a missing tool fails a
// test instead of skipping it.
func ciMode() bool { return os.Getenv("GOROLLING_CI") != "" }

// sysPath is PATH with the system directories dpkg insists on.
func sysPath() string {
	return os.Getenv("PATH") + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
}

// requireTools skips the test when a tool is missing, or fails it under
// GOROLLING_CI.
func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err == nil {
			continue
		}
		if _, err := lookSysPath(tool); err == nil {
			continue
		}
		if ciMode() {
			t.Fatalf("%s is not installed and GOROLLING_CI is set: CI must install it (see packaging/README.md)", tool)
		}
		t.Skipf("skipping: %s is not installed (GOROLLING_CI=1 makes this a failure; see packaging/README.md)", tool)
	}
}

func lookSysPath(tool string) (string, error) {
	for _, dir := range filepath.SplitList(sysPath()) {
		p := filepath.Join(dir, tool)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", exec.ErrNotFound
}

// requireRoot skips the test unless it runs as root, or fails it under
// GOROLLING_CI.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if ciMode() {
		t.Fatal("not root and GOROLLING_CI is set: installing packages needs root")
	}
	t.Skip("skipping: installing packages needs root (GOROLLING_CI=1 makes this a failure)")
}

// command runs a command with a deadline and the system PATH, and
// returns its combined output.
func command(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "PATH="+sysPath(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

func mustCommand(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := command(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

var (
	buildMu sync.Mutex
	built   = map[string][2]string{}
)

// buildFor builds the packages of a version once, through the command's
// own entry point, and returns the paths of the .deb and the .rpm.
func buildFor(t *testing.T, version string) (debPath, rpmPath string) {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[version]; ok {
		return p[0], p[1]
	}
	out := filepath.Join(workDir, "dist-"+version)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	if code := run(ctx, []string{"-version", version, "-out", out}, &stdout, &stderr); code != 0 {
		t.Fatalf("build the %s packages: exit %d\n%s", version, code, stderr.String())
	}
	debName, rpmName := packageFileNames(version, runtime.GOARCH)
	want := []string{filepath.Join(out, debName), filepath.Join(out, rpmName)}
	if got := strings.Fields(stdout.String()); !slices.Equal(got, want) {
		t.Fatalf("the builder printed %q, want %q", got, want)
	}
	for _, p := range want {
		if _, err := os.Stat(p); err != nil {
			t.Fatal(err)
		}
	}
	built[version] = [2]string{want[0], want[1]}
	return want[0], want[1]
}

var exampleOnce struct {
	sync.Mutex
	path string
}

// exampleServer builds cmd/example-server once and returns its path. The
// binary and every directory above it are readable and searchable by all,
// so workers dropped to another user (gorolling exec --user nobody) can
// run it.
func exampleServer(t *testing.T) string {
	t.Helper()
	exampleOnce.Lock()
	defer exampleOnce.Unlock()
	if exampleOnce.path != "" {
		return exampleOnce.path
	}
	goCmd, err := goTool()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(workDir, "bin")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// os.MkdirTemp made workDir 0700.
	for _, d := range []string{workDir, dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for d := filepath.Dir(workDir); ; d = filepath.Dir(d) {
		if fi, err := os.Stat(d); err != nil || fi.Mode().Perm()&0o001 == 0 {
			t.Fatalf("%s (above the test directory %s) is not searchable by other users (%v), so workers running as another user could not start example-server; set TMPDIR to a directory that is", d, workDir, err)
		}
		if d == filepath.Dir(d) {
			break
		}
	}
	path := filepath.Join(dir, "example-server")
	cmd := exec.Command(goCmd, "build", "-o", path, "./cmd/example-server")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build example-server: %v\n%s", err, out)
	}
	if err := os.Chmod(path, 0o755); err != nil {
		t.Fatal(err)
	}
	exampleOnce.path = path
	return path
}

// wantFile is a regular file a package must contain.
type wantFile struct {
	path  string
	perms string // as ls and dpkg-deb -c print them
}

// expectedFiles lists the regular files of the package of a format.
func expectedFiles(format string) []wantFile {
	want := []wantFile{
		{binPath, "-rwxr-xr-x"},
		{unitPath, "-rw-r--r--"},
		{examplePath, "-rw-r--r--"},
		{manPath, "-rw-r--r--"},
		{docDir + "/LICENSE", "-rw-r--r--"},
	}
	if format == "deb" {
		want = append(want, wantFile{docDir + "/copyright", "-rw-r--r--"})
	}
	if _, err := os.Stat("../README.md"); err == nil {
		want = append(want, wantFile{docDir + "/README.md", "-rw-r--r--"})
	}
	return want
}

// controlFields parses "Key: value" lines (dpkg-deb -I, rpm -qpi).
func controlFields(out string) map[string]string {
	f := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(l), ":")
		// dpkg's keys have no spaces; rpm pads its keys ("Name        :").
		if !ok || strings.Contains(strings.TrimSpace(k), " ") && !strings.HasSuffix(k, " ") {
			continue
		}
		k = strings.TrimSpace(k)
		if _, dup := f[k]; !dup {
			f[k] = strings.TrimSpace(v)
		}
	}
	return f
}

func TestDebContents(t *testing.T) {
	requireTools(t, "dpkg-deb", "sh")
	debPath, _ := buildFor(t, versionA)

	// dpkg-deb -c: "perms owner/group size date time ./path"
	entries := map[string][2]string{}
	for _, l := range strings.Split(strings.TrimSpace(mustCommand(t, "dpkg-deb", "-c", debPath)), "\n") {
		f := strings.Fields(l)
		if len(f) < 6 {
			t.Fatalf("unexpected dpkg-deb -c line %q", l)
		}
		path := strings.TrimSuffix(strings.TrimPrefix(f[5], "."), "/")
		entries[path] = [2]string{f[0], f[1]}
	}
	want := expectedFiles("deb")
	for _, w := range want {
		e, ok := entries[w.path]
		if !ok {
			t.Errorf("%s is not in the .deb", w.path)
			continue
		}
		if e[0] != w.perms || e[1] != "root/root" {
			t.Errorf("%s is %s %s, want %s root/root", w.path, e[0], e[1], w.perms)
		}
	}
	for path, e := range entries {
		if !strings.HasPrefix(e[0], "d") && !slices.ContainsFunc(want, func(w wantFile) bool { return w.path == path }) {
			t.Errorf("unexpected file %s (%s) in the .deb", path, e[0])
		}
		if strings.HasPrefix(path, "/etc") {
			t.Errorf("%s: the package must install nothing in /etc", path)
		}
	}

	info := mustCommand(t, "dpkg-deb", "-I", debPath)
	fields := controlFields(info)
	for k, v := range map[string]string{
		"Package":      "gorolling",
		"Version":      versionA,
		"Architecture": archs[runtime.GOARCH].deb,
		"Maintainer":   defaultMaintainer,
		"Homepage":     homepage,
		"Section":      "admin",
		"Priority":     "optional",
		"Recommends":   "systemd",
		"Description":  summary,
	} {
		if fields[k] != v {
			t.Errorf("control field %s is %q, want %q", k, fields[k], v)
		}
	}
	for _, k := range []string{"Depends", "Pre-Depends", "Conflicts"} {
		if v, ok := fields[k]; ok {
			t.Errorf("control field %s: %q; a static binary needs none", k, v)
		}
	}
	if strings.Contains(info, "conffiles") {
		t.Error("the .deb has conffiles; dpkg -r would leave them behind")
	}

	// The maintainer scripts: executable, #!/bin/sh, exactly as rendered.
	ctl := t.TempDir()
	mustCommand(t, "dpkg-deb", "-e", debPath, ctl)
	for _, name := range scriptNames["deb"] {
		if !regexpLine(info, `^\s*\d+ bytes,\s+\d+ lines\s+\*\s+`+name+`\s+#!/bin/sh$`) {
			t.Errorf("dpkg-deb -I lists no executable #!/bin/sh %s:\n%s", name, info)
		}
		got, err := os.ReadFile(filepath.Join(ctl, name))
		if err != nil {
			t.Error(err)
			continue
		}
		want, err := renderScript("deb", name, installedPaths)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s in the .deb differs from scripts/deb/%s as rendered", name, name)
		}
		if out, err := command("sh", "-n", filepath.Join(ctl, name)); err != nil {
			t.Errorf("%s: %v %s", name, err, out)
		}
	}
	for _, name := range []string{"preinst", "conffiles"} {
		if _, err := os.Stat(filepath.Join(ctl, name)); err == nil {
			t.Errorf("unexpected %s in the control archive", name)
		}
	}
}

func regexpLine(text, re string) bool {
	return regexpMust("(?m)" + re).MatchString(text)
}

func TestRPMContents(t *testing.T) {
	requireTools(t, "rpm")
	_, rpmPath := buildFor(t, versionA)

	want := expectedFiles("rpm")
	var wantList []string
	for _, w := range want {
		wantList = append(wantList, w.path)
	}
	wantList = append(wantList, docDir, docDir+"/examples")
	slices.Sort(wantList)
	list := strings.Fields(mustCommand(t, "rpm", "-qpl", rpmPath))
	slices.Sort(list)
	if !slices.Equal(list, wantList) {
		t.Errorf("rpm -qpl:\n  %s\nwant:\n  %s", strings.Join(list, "\n  "), strings.Join(wantList, "\n  "))
	}

	modes := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(mustCommand(t, "rpm", "-qp", "--qf",
		`[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]`, rpmPath)), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 {
			t.Fatalf("unexpected rpm file line %q", l)
		}
		modes[f[2]] = f[0] + " " + f[1]
	}
	for _, w := range want {
		if got := modes[w.path]; got != w.perms+" root:root" {
			t.Errorf("%s is %q, want %q", w.path, got, w.perms+" root:root")
		}
	}
	for _, d := range []string{docDir, docDir + "/examples"} {
		if got := modes[d]; got != "drwxr-xr-x root:root" {
			t.Errorf("%s is %q, want an owned drwxr-xr-x root:root", d, got)
		}
	}

	fields := controlFields(mustCommand(t, "rpm", "-qpi", rpmPath))
	for k, v := range map[string]string{
		"Name":         "gorolling",
		"Version":      versionA,
		"Release":      "1",
		"Architecture": archs[runtime.GOARCH].rpm,
		"License":      "MIT",
		"Group":        "Applications/System",
		"URL":          homepage,
		"Summary":      summary,
		"Vendor":       "gorolling",
	} {
		if fields[k] != v {
			t.Errorf("rpm -qpi %s is %q, want %q", k, fields[k], v)
		}
	}
	if got := strings.TrimSpace(mustCommand(t, "rpm", "-qp", "--recommends", rpmPath)); got != "systemd" {
		t.Errorf("recommends %q, want systemd", got)
	}
	for _, r := range strings.Fields(mustCommand(t, "rpm", "-qp", "--requires", rpmPath)) {
		if !strings.HasPrefix(r, "rpmlib(") && r != "/bin/sh" && !strings.ContainsAny(r, "<=>") && !isVersion(r) {
			t.Errorf("unexpected requirement %q: a static binary needs none", r)
		}
	}

	// rpm -qp --scripts: "NAME scriptlet (using /bin/sh):" then the body.
	scripts := map[string]string{}
	var cur string
	var body strings.Builder
	flush := func() {
		if cur != "" {
			scripts[cur] = strings.TrimSpace(body.String())
		}
		body.Reset()
	}
	sc := bufio.NewScanner(strings.NewReader(mustCommand(t, "rpm", "-qp", "--scripts", rpmPath)))
	for sc.Scan() {
		if m := regexpMust(`^(\w+) scriptlet \(using /bin/sh\):$`).FindStringSubmatch(sc.Text()); m != nil {
			flush()
			cur = m[1]
			continue
		}
		body.WriteString(sc.Text() + "\n")
	}
	flush()
	for name, scriptlet := range map[string]string{"post": "postinstall", "preun": "preuninstall", "postun": "postuninstall"} {
		want, err := renderScript("rpm", name, installedPaths)
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := scripts[scriptlet]; !ok {
			t.Errorf("no %s scriptlet", scriptlet)
		} else if got != strings.TrimSpace(string(want)) {
			t.Errorf("%s scriptlet differs from scripts/rpm/%s as rendered:\n%s", scriptlet, name, got)
		}
		delete(scripts, scriptlet)
	}
	for name := range scripts {
		t.Errorf("unexpected %s scriptlet", name)
	}
}

// isVersion reports whether s is the version part of a requirement
// ("rpmlib(X) <= 4.0-1" prints as three words).
func isVersion(s string) bool {
	return s != "" && strings.Trim(s, "0123456789.-") == ""
}

// debStatus returns dpkg's status of the gorolling package:
// "not-installed" when dpkg does not know it.
func debStatus() string {
	out, err := exec.Command("dpkg-query", "-W", "-f=${db:Status-Status}", "gorolling").Output()
	if err != nil || strings.TrimSpace(string(out)) == "" {
		return "not-installed"
	}
	return strings.TrimSpace(string(out))
}

// claimDpkg makes sure the test may install and remove the gorolling
// package, and purges it when the test ends, whatever happened.
func claimDpkg(t *testing.T) {
	t.Helper()
	requireRoot(t)
	requireTools(t, "dpkg", "dpkg-query", "dpkg-deb")
	if s := debStatus(); s != "not-installed" {
		msg := "the gorolling package is already on this machine (status " + s + "); the test would replace and remove it: run 'dpkg --purge gorolling' first"
		if ciMode() {
			t.Fatal(msg)
		}
		t.Skip("skipping: " + msg)
	}
	t.Cleanup(func() {
		if debStatus() == "not-installed" {
			return
		}
		if out, err := command("dpkg", "--purge", "gorolling"); err != nil {
			t.Errorf("cleanup: %v\n%s", err, out)
		}
	})
}

// removeAndCheck runs "dpkg -r gorolling", checks that no file of the
// package is left, then purges it and checks dpkg has forgotten it.
//
// After "dpkg -r" dpkg keeps the package in state config-files although
// it has no conffiles: it keeps the postrm script to run "postrm purge"
// later. That postrm is what reloads systemd after the unit file is gone.
func removeAndCheck(t *testing.T, debPath string) {
	t.Helper()
	mustCommand(t, "dpkg", "-r", "gorolling")
	assertNoFiles(t, debPath)
	if s := debStatus(); s != "config-files" {
		t.Errorf("dpkg status %q after dpkg -r, want config-files", s)
	}
	if out, _ := command("dpkg", "-L", "gorolling"); !strings.Contains(out, "does not contain any files") {
		t.Errorf("dpkg -L gorolling after dpkg -r lists:\n%s", out)
	}
	mustCommand(t, "dpkg", "--purge", "gorolling")
	assertNoFiles(t, debPath)
	if s := debStatus(); s != "not-installed" {
		t.Errorf("dpkg status %q after dpkg --purge, want not-installed", s)
	}
	if out, err := command("dpkg", "-L", "gorolling"); err == nil {
		t.Errorf("dpkg -L gorolling succeeds after purging:\n%s", out)
	}
}

// assertNoFiles checks that no file or directory of the package exists,
// apart from shared directories such as /usr/bin, and nothing in /etc.
func assertNoFiles(t *testing.T, debPath string) {
	t.Helper()
	var left []string
	for _, l := range strings.Split(strings.TrimSpace(mustCommand(t, "dpkg-deb", "-c", debPath)), "\n") {
		f := strings.Fields(l)
		path := strings.TrimSuffix(strings.TrimPrefix(f[len(f)-1], "."), "/")
		if strings.HasPrefix(f[0], "d") && !strings.Contains(path, "gorolling") {
			continue
		}
		if _, err := os.Lstat(path); err == nil {
			left = append(left, path)
		}
	}
	if _, err := os.Lstat("/etc/gorolling"); err == nil {
		left = append(left, "/etc/gorolling")
	}
	if len(left) > 0 {
		t.Errorf("left behind after removal: %s", strings.Join(left, ", "))
	}
}

// verifyUnit runs systemd-analyze verify on a unit file. Any message
// about it is a failure, since systemd merely warns about unknown or
// misspelled settings. The man page check runs when man(1) exists.
func verifyUnit(path string) error {
	args := []string{"verify"}
	if _, err := exec.LookPath("man"); err != nil {
		args = append(args, "--man=no")
	}
	out, err := command("systemd-analyze", append(args, path)...)
	if err != nil {
		return err
	}
	var msgs []string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "gorolling") {
			msgs = append(msgs, l)
		}
	}
	if len(msgs) > 0 {
		return fmt.Errorf("systemd-analyze verify %s:\n%s", path, strings.Join(msgs, "\n"))
	}
	return nil
}

// TestDebInstallRunRemove installs the .deb, checks the installed files,
// verifies the unit, serves HTTP through the installed binary, stops it,
// removes and purges the package and checks nothing is left.
func TestDebInstallRunRemove(t *testing.T) {
	claimDpkg(t)
	requireTools(t, "systemd-analyze")
	if _, err := exec.LookPath("man"); err != nil {
		t.Log("man(1) is not installed: systemd-analyze verify will not check the Documentation= man page")
	}
	debPath, _ := buildFor(t, versionA)
	server := exampleServer(t)

	mustCommand(t, "dpkg", "-i", debPath)
	if s := debStatus(); s != "installed" {
		t.Fatalf("dpkg status %q after dpkg -i", s)
	}
	for _, w := range expectedFiles("deb") {
		fi, err := os.Stat(w.path)
		if err != nil {
			t.Errorf("installed: %v", err)
			continue
		}
		if fi.Mode().String() != w.perms {
			t.Errorf("installed %s is %s, want %s", w.path, fi.Mode(), w.perms)
		}
	}
	if got := mustCommand(t, binPath, "version"); got != "gorolling "+versionA+"\n" {
		t.Errorf("%s version printed %q, want %q", binPath, got, "gorolling "+versionA+"\n")
	}
	checkManPage(t)
	// The example's OPTIONS must be flags the installed binary knows.
	if b, err := os.ReadFile(examplePath); err != nil {
		t.Error(err)
	} else if opts := exampleVars(string(b))["OPTIONS"]; opts == "" {
		t.Errorf("%s sets no OPTIONS", examplePath)
	} else if out, err := command(binPath, append(append([]string{"exec"}, strings.Fields(opts)...), "--help")...); err != nil {
		t.Errorf("the example's OPTIONS are not valid gorolling exec flags: %v", err)
	} else if !strings.Contains(out, "Usage: gorolling exec") {
		t.Errorf("gorolling exec %s --help printed %q", opts, out)
	}

	t.Run("systemd-analyze verify", func(t *testing.T) {
		if err := verifyUnit(unitPath); err != nil {
			t.Errorf("the installed unit does not verify: %v", err)
		}
		// The same check must reject a broken unit, or it proves nothing.
		unit, err := os.ReadFile(unitPath)
		if err != nil {
			t.Fatal(err)
		}
		for name, broken := range map[string]string{
			"missing binary": strings.Replace(string(unit), "ExecStart=/usr/bin/gorolling ", "ExecStart=/usr/bin/gorolling-missing ", 1),
			"misspelt key":   strings.Replace(string(unit), "[Service]\n", "[Service]\nDrainTimeoutSec=30\n", 1),
			"bad value":      strings.Replace(string(unit), "KillMode=control-group", "KillMode=gently", 1),
		} {
			if broken == string(unit) {
				t.Fatalf("%s: the mutation did not apply", name)
			}
			path := filepath.Join(t.TempDir(), "gorolling@.service")
			if err := os.WriteFile(path, []byte(broken), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := verifyUnit(path); err == nil {
				t.Errorf("systemd-analyze verify accepts a unit with a %s", name)
			} else {
				t.Logf("a unit with a %s is rejected: %v", name, err)
			}
		}
	})

	t.Run("exec", func(t *testing.T) { serveThroughInstalledBinary(t, server) })

	removeAndCheck(t, debPath)
}

// checkManPage checks the installed man page is gzipped roff for this
// version.
func checkManPage(t *testing.T) {
	t.Helper()
	f, err := os.Open(manPath)
	if err != nil {
		t.Error(err)
		return
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Errorf("%s: %v", manPath, err)
		return
	}
	page, err := io.ReadAll(zr)
	if err != nil {
		t.Errorf("%s: %v", manPath, err)
		return
	}
	if !bytes.HasPrefix(page, []byte(".TH GOROLLING 1 ")) || !bytes.Contains(page, []byte("gorolling "+versionA)) {
		t.Errorf("%s is not gorolling(1) for %s:\n%.200s", manPath, versionA, page)
	}
}

// freePort returns a port that was free on 127.0.0.1 a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

// serveThroughInstalledBinary runs "/usr/bin/gorolling exec -w 2" over
// example-server, makes a request, and stops the master with SIGTERM.
func serveThroughInstalledBinary(t *testing.T, server string) {
	port := freePort(t)
	logPath := filepath.Join(t.TempDir(), "master.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(binPath, "exec", "-w", "2", "--", server, "-listen", "127.0.0.1:"+port)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var exited bool
	var workers []int
	logs := func() string { b, _ := os.ReadFile(logPath); return string(b) }
	t.Cleanup(func() {
		if !exited {
			syscall.Kill(pid, syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				syscall.Kill(pid, syscall.SIGKILL)
				<-done
			}
		}
		for _, w := range workers {
			if syscall.Kill(w, 0) == nil {
				syscall.Kill(w, syscall.SIGKILL)
			}
		}
	})

	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	url := "http://127.0.0.1:" + port + "/"
	var resp *http.Response
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err = client.Get(url)
		if err == nil {
			break
		}
		select {
		case err := <-done:
			exited = true
			t.Fatalf("the master exited (%v) before serving:\n%s", err, logs())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no answer on %s within 20s: %v\n%s", url, err, logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	wpid, _ := strconv.Atoi(resp.Header.Get("X-Pid"))
	if wpid > 0 {
		workers = append(workers, wpid)
	}
	if resp.StatusCode != http.StatusOK || wpid <= 0 || wpid == pid ||
		resp.Header.Get("X-Generation") != "1" || !slices.Contains([]string{"0", "1"}, resp.Header.Get("X-Slot")) ||
		!strings.Contains(string(body), "hello from pid") {
		t.Errorf("unexpected answer: %s %v %q", resp.Status, resp.Header, body)
	}

	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		exited = true
		if err != nil {
			t.Errorf("the master exited with %v after SIGTERM, want status 0:\n%s", err, logs())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the master did not exit within 30s of SIGTERM:\n%s", logs())
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, time.Second); err == nil {
		c.Close()
		t.Error("the port still accepts connections after the master stopped")
	}
	if wpid > 0 {
		gone := false
		for i := 0; i < 50 && !gone; i++ {
			gone = errors.Is(syscall.Kill(wpid, 0), syscall.ESRCH)
			time.Sleep(100 * time.Millisecond)
		}
		if !gone {
			t.Errorf("worker %d still runs after the master stopped", wpid)
		}
	}
}

// TestDebUpgrade installs version A, then the release candidate of B over
// it, then B, with no master running and without systemd as pid 1 (each
// must be an upgrade, not a downgrade, to dpkg), then reinstalls B with a
// stale control socket in /run/gorolling: the master upgrade fails and is
// logged, the package operation succeeds. TestDebUpgradeUnderLoad upgrades
// a running master.
func TestDebUpgrade(t *testing.T) {
	claimDpkg(t)
	debA, _ := buildFor(t, versionA)
	debRC, _ := buildFor(t, versionRC)
	debB, _ := buildFor(t, versionB)
	if _, err := os.Stat("/run/systemd/system"); err == nil {
		t.Log("systemd is pid 1 here: the scripts also run systemctl daemon-reload")
	}
	for _, pair := range [][2]string{{versionA, versionRC}, {versionRC, versionB}} {
		if _, err := command("dpkg", "--compare-versions", pkgVersion(pair[0]), "lt", pkgVersion(pair[1])); err != nil {
			t.Errorf("dpkg does not sort package version %s before %s: %v", pkgVersion(pair[0]), pkgVersion(pair[1]), err)
		}
	}

	mustCommand(t, "dpkg", "-i", debA)
	for _, step := range []struct{ version, deb string }{{versionRC, debRC}, {versionB, debB}} {
		out := mustCommand(t, "dpkg", "-i", step.deb)
		if strings.Contains(strings.ToLower(out), "downgrading") {
			t.Errorf("dpkg -i %s is a downgrade:\n%s", filepath.Base(step.deb), out)
		}
		if got := mustCommand(t, "dpkg-query", "-W", "-f=${Version}", "gorolling"); got != pkgVersion(step.version) {
			t.Errorf("installed version %q, want %q", got, pkgVersion(step.version))
		}
		if got := mustCommand(t, binPath, "version"); got != "gorolling "+step.version+"\n" {
			t.Errorf("%s version printed %q after the upgrade to %s", binPath, got, step.version)
		}
	}

	// A master that died without removing its control socket.
	runDir := installedPaths.runDir
	if _, err := os.Stat(runDir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(runDir, 0o700); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(runDir) })
	}
	sock := filepath.Join(runDir, fmt.Sprintf("pkgtest-%d.sock", os.Getpid()))
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	t.Cleanup(func() { os.Remove(sock) })

	out := mustCommand(t, "dpkg", "-i", debB)
	if !strings.Contains(out, "re-executing the master behind "+sock) || !strings.Contains(out, "warning: the master behind "+sock+" was not upgraded") {
		t.Errorf("reinstalling with a stale control socket: want the attempt and the warning logged, got:\n%s", out)
	}
	if s := debStatus(); s != "installed" {
		t.Errorf("dpkg status %q after reinstalling", s)
	}

	removeAndCheck(t, debB)
}

// TestRPMInstallRemove installs the .rpm into a scratch root with its own
// database (scripts off: the root has no shell), checks the installed
// files, upgrades it to the release candidate of B and then to B (rpm -U
// refuses an older version), erases it and checks nothing of it is left.
// The scripts themselves are covered by TestMaintainerScripts.
func TestRPMInstallRemove(t *testing.T) {
	requireRoot(t)
	requireTools(t, "rpm")
	_, rpmA := buildFor(t, versionA)
	_, rpmRC := buildFor(t, versionRC)
	_, rpmB := buildFor(t, versionB)
	root := t.TempDir()
	rpmIn := func(args ...string) string {
		t.Helper()
		return mustCommand(t, "rpm", append([]string{"--root", root, "--dbpath", "/var/lib/rpm"}, args...)...)
	}

	rpmIn("-i", "--nodeps", "--noscripts", rpmA)
	for _, w := range expectedFiles("rpm") {
		fi, err := os.Stat(filepath.Join(root, w.path))
		if err != nil {
			t.Errorf("installed: %v", err)
			continue
		}
		if fi.Mode().String() != w.perms {
			t.Errorf("installed %s is %s, want %s", w.path, fi.Mode(), w.perms)
		}
	}
	rpmIn("-V", "gorolling")
	if got := mustCommand(t, filepath.Join(root, binPath), "version"); got != "gorolling "+versionA+"\n" {
		t.Errorf("installed binary printed %q", got)
	}

	for _, step := range []struct{ version, rpm string }{{versionRC, rpmRC}, {versionB, rpmB}} {
		rpmIn("-U", "--nodeps", "--noscripts", step.rpm)
		if got := strings.TrimSpace(rpmIn("-q", "--qf", "%{VERSION}-%{RELEASE}", "gorolling")); got != pkgVersion(step.version)+"-1" {
			t.Errorf("after rpm -U: installed %q, want %q", got, pkgVersion(step.version)+"-1")
		}
	}

	rpmIn("-e", "--noscripts", "gorolling")
	var left []string
	filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if rel := strings.TrimPrefix(path, root); err == nil && strings.Contains(rel, "gorolling") {
			left = append(left, rel)
		}
		return nil
	})
	if len(left) > 0 {
		t.Errorf("left behind after rpm -e: %s", strings.Join(left, ", "))
	}
}
