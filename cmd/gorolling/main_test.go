package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

func TestCommandLine(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		code int
		out  string // expected in stdout
		err  string // expected in stderr
	}{
		{name: "no args", args: nil, code: 2, err: "Usage:"},
		{name: "help", args: []string{"--help"}, code: 0, out: "gorolling upgrade  start the same upgrade"},
		{name: "help upgrade", args: []string{"help", "upgrade"}, code: 0, out: "--wait"},
		{name: "scale without a number", args: []string{"scale", "many"}, code: 2, err: "is not a number"},
		{name: "status with no master", args: []string{"status", "--control", "/nonexistent/x.sock"}, code: 1, err: "connect to the master"},
		{name: "help exec", args: []string{"help", "exec"}, code: 0, out: "--drain-timeout"},
		{name: "exec --help", args: []string{"exec", "--help"}, code: 0, out: "--ready-timeout"},
		{name: "version", args: []string{"version"}, code: 0, out: "gorolling "},
		{name: "unknown command", args: []string{"frobnicate"}, code: 2, err: `unknown command "frobnicate"`},
		{name: "no program", args: []string{"exec"}, code: 2, err: "no program given"},
		{name: "bad workers", args: []string{"exec", "-w", "0", "--", "true"}, code: 2, err: "--workers must be at least 1"},
		{name: "bad flag", args: []string{"exec", "--frob", "x"}, code: 2, err: "unknown flag: --frob"},
		{name: "bad signal", args: []string{"exec", "--stop-signal", "BOGUS", "--", "true"}, code: 2, err: `unknown signal "BOGUS"`},
		{name: "bad log format", args: []string{"exec", "--log-format", "xml", "--", "true"}, code: 2, err: `unknown log format "xml"`},
		{name: "bad log level", args: []string{"exec", "--log-level", "loud", "--", "true"}, code: 2, err: `unknown log level "loud"`},
		{name: "bad timeout", args: []string{"exec", "--drain-timeout", "-1s", "--", "true"}, code: 2, err: "--drain-timeout must be positive"},
		{name: "bad metrics address", args: []string{"exec", "--metrics", "9464", "--", "true"}, code: 2, err: "--metrics \"9464\": want HOST:PORT"},
		{name: "chdir to nothing", args: []string{"exec", "--chdir", "/nonexistent/dir", "--", "true"}, code: 1, err: "--chdir"},
		{name: "ls --json of an empty dir", args: []string{"ls", "--json", "--dir", "/nonexistent/dir"}, code: 0, out: "[]"},
		{name: "completion without a shell", args: []string{"completion"}, code: 2, err: "bash or zsh"},
		{name: "completion zsh", args: []string{"completion", "zsh"}, code: 0, out: "#compdef gorolling"},
		{name: "program not found", args: []string{"exec", "--log-level", "error", "--", "/nonexistent/prog"}, code: 1, err: "not found"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(tc.args, &out, &errb)
			if code != tc.code {
				t.Errorf("exit %d, want %d (stderr %q)", code, tc.code, errb.String())
			}
			if !strings.Contains(out.String(), tc.out) {
				t.Errorf("stdout %q, want it to contain %q", out.String(), tc.out)
			}
			if !strings.Contains(errb.String(), tc.err) {
				t.Errorf("stderr %q, want it to contain %q", errb.String(), tc.err)
			}
		})
	}
}

func TestParseSignal(t *testing.T) {
	for in, want := range map[string]int{"TERM": 15, "SIGTERM": 15, "term": 15, "QUIT": 3, "10": 10} {
		got, err := parseSignal(in)
		if err != nil || int(got) != want {
			t.Errorf("parseSignal(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "99", "NOPE"} {
		if _, err := parseSignal(in); err == nil {
			t.Errorf("parseSignal(%q) accepted", in)
		}
	}
}

// TestBashCompletion runs the generated script in bash: commands, a
// command's flags, and help's arguments complete.
func TestBashCompletion(t *testing.T) {
	var script bytes.Buffer
	if code := run([]string{"completion", "bash"}, &script, &bytes.Buffer{}); code != 0 {
		t.Fatalf("completion bash: exit %d", code)
	}
	for words, want := range map[string]string{
		"gorolling ex":                "exec",
		"gorolling exec --ch":         "--chdir",
		"gorolling exec --metr":       "--metrics",
		"gorolling status --na":       "--name",
		"gorolling ls --j":            "--json",
		"gorolling help upg":          "upgrade",
		"gorolling completion z":      "zsh",
		"gorolling exec --chdir /u":   "/usr",
		"gorolling exec --fd-store o": "on",
	} {
		f := strings.Fields(words)
		if strings.HasSuffix(words, " ") {
			f = append(f, "")
		}
		prog := script.String() + "\nCOMP_WORDS=(" + strings.Join(f, " ") + "); COMP_CWORD=" + strconv.Itoa(len(f)-1) + "; _gorolling; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
		out, err := exec.Command("bash", "-c", prog).CombinedOutput()
		if err != nil {
			t.Fatalf("bash: %v\n%s", err, out)
		}
		got := strings.Fields(string(out))
		found := false
		for _, g := range got {
			found = found || g == want
		}
		if !found {
			t.Errorf("%q completes to %v, want %q among them", words, got, want)
		}
	}
}

// TestZshCompletion installs the zsh script the way the help says (a
// _gorolling file in $fpath, autoloaded by compinit) and presses Tab in a
// real interactive zsh on a pseudo-terminal: the first Tab completes
// already, and so does the next.
func TestZshCompletion(t *testing.T) {
	zsh, err := exec.LookPath("zsh")
	if err != nil {
		if os.Getenv("GOROLLING_CI") != "" {
			t.Fatal("zsh is not installed; .ci/run installs it")
		}
		t.Skip("zsh is not installed (CI installs it; see .ci/run)")
	}
	dir := t.TempDir()
	fn := filepath.Join(dir, "fn")
	if err := os.Mkdir(fn, 0o755); err != nil {
		t.Fatal(err)
	}
	var script bytes.Buffer
	if code := run([]string{"completion", "zsh"}, &script, &bytes.Buffer{}); code != 0 {
		t.Fatalf("completion zsh: exit %d", code)
	}
	if err := os.WriteFile(filepath.Join(fn, "_gorolling"), script.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	// The completion only needs the command to exist (the names after
	// --name come from running it, which these words do not reach).
	if err := os.WriteFile(filepath.Join(dir, "gorolling"), []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	// A zsh script drives the interactive one through zsh/zpty: type a
	// word and Tab, then print a marker and read what the line became.
	driver := `zmodload zsh/zpty
zpty -b z "PATH=$DIR:\$PATH HOME=$DIR TERM=dumb zsh -f -i"
zpty -w z "PS1='> '; fpath=($DIR/fn \$fpath); autoload -Uz compinit; compinit -u"
sleep 0.5
zpty -w -n z $'gorolling sta\t'
sleep 1
zpty -w z $'\x15echo MARK1'
zpty -w -n z $'gorolling sto\t'
sleep 1
zpty -w z $'\x15echo MARK2'
sleep 0.5
out=""
while zpty -r -t z line; do out+="$line"; done
print -r -- "$out"
zpty -d z
`
	cmd := exec.Command(zsh, "-f", "-c", driver)
	cmd.Env = append(os.Environ(), "DIR="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("zsh: %v\n%s", err, out)
	}
	// Strip the terminal's escapes before looking at the lines.
	text := regexp.MustCompile(`\x1b\[[0-9;?]*[a-zA-Z]`).ReplaceAllString(strings.ReplaceAll(string(out), "\r", ""), "")
	first, second, ok := strings.Cut(text, "MARK1")
	if !ok || !strings.Contains(second, "MARK2") {
		t.Fatalf("the driver did not get through both words:\n%q", text)
	}
	if !strings.Contains(first, "gorolling status") {
		t.Errorf("the first Tab after \"gorolling sta\" did not complete to \"gorolling status\":\n%q", first)
	}
	if !strings.Contains(second, "gorolling stop") {
		t.Errorf("the second Tab after \"gorolling sto\" did not complete to \"gorolling stop\":\n%q", second)
	}
}

// TestCompletionNamesAreInert: names of control sockets (which another
// user may choose, in a directory of theirs) complete only if they are
// plain, and nothing in them is ever run.
func TestCompletionNamesAreInert(t *testing.T) {
	var script bytes.Buffer
	if code := run([]string{"completion", "bash"}, &script, &bytes.Buffer{}); code != 0 {
		t.Fatalf("completion bash: exit %d", code)
	}
	dir := t.TempDir()
	fake := "#!/bin/sh\nprintf '[\\n  {\\n    \"name\": \"$(touch${IFS}PWNED)\",\\n  },\\n  {\\n    \"name\": \"api\",\\n  }\\n]\\n'\n"
	if err := os.WriteFile(filepath.Join(dir, "gorolling"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	prog := script.String() + "\nCOMP_WORDS=(gorolling status --name ''); COMP_CWORD=3; _gorolling; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
	cmd := exec.Command("bash", "-c", prog)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PATH="+dir+":"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("bash: %v\n%s", err, out)
	}
	if got := strings.Fields(string(out)); len(got) != 1 || got[0] != "api" {
		t.Errorf("--name completes to %q, want only api", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "PWNED")); err == nil {
		t.Error("completing --name ran a command hidden in a socket name")
	}
}
