package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

func TestParseFlags(t *testing.T) {
	for _, tc := range []struct {
		name        string
		args        []string
		wantErr     string // "" for success
		wantVersion string
		wantArch    string
	}{
		{name: "minimal", args: []string{"-version", "0.1.0"}, wantVersion: "0.1.0", wantArch: runtime.GOARCH},
		{name: "leading v", args: []string{"-version", "v1.2.3"}, wantVersion: "1.2.3", wantArch: runtime.GOARCH},
		{name: "prerelease", args: []string{"-version", "1.2.0-rc.1", "-arch", "arm64"}, wantVersion: "1.2.0-rc.1", wantArch: "arm64"},
		{name: "no version", args: nil, wantErr: "-version is required"},
		{name: "empty version", args: []string{"-version", ""}, wantErr: "-version is required"},
		{name: "two parts", args: []string{"-version", "1.2"}, wantErr: `malformed -version "1.2"`},
		{name: "leading zero", args: []string{"-version", "01.2.3"}, wantErr: "malformed -version"},
		{name: "build metadata", args: []string{"-version", "1.2.3+git"}, wantErr: "malformed -version"},
		{name: "space", args: []string{"-version", "1.2.3 "}, wantErr: "malformed -version"},
		{name: "injection", args: []string{"-version", "1.2.3 -X main.x=y"}, wantErr: "malformed -version"},
		{name: "hyphen in prerelease", args: []string{"-version", "1.2.3-rc-1"}, wantErr: "malformed -version"},
		{name: "bad arch", args: []string{"-version", "0.1.0", "-arch", "sparc"}, wantErr: `unsupported -arch "sparc"`},
		{name: "empty out", args: []string{"-version", "0.1.0", "-out", ""}, wantErr: "-out is empty"},
		{name: "bad maintainer", args: []string{"-version", "0.1.0", "-maintainer", "nobody"}, wantErr: "malformed -maintainer"},
		{name: "bad root", args: []string{"-version", "0.1.0", "-root", "/"}, wantErr: "no go.mod for module"},
		{name: "extra argument", args: []string{"-version", "0.1.0", "rpm"}, wantErr: `unexpected argument "rpm"`},
		{name: "unknown flag", args: []string{"-frob"}, wantErr: "flag provided but not defined: -frob"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseFlags(tc.args, &bytes.Buffer{})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if o.version != tc.wantVersion || o.arch != tc.wantArch {
				t.Errorf("version %q arch %q, want %q %q", o.version, o.arch, tc.wantVersion, tc.wantArch)
			}
			root, _ := filepath.Abs("..")
			if o.root != root {
				t.Errorf("root %q, want %q", o.root, root)
			}
		})
	}
}

// TestOutRelativeToInvocation checks a relative -out is taken from $PWD,
// the directory "go -C packaging run ." was started in.
func TestOutRelativeToInvocation(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("PWD", dir)
	o, err := parseFlags([]string{"-version", "0.1.0", "-out", "dist"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "dist"); o.out != want {
		t.Errorf("out %q, want %q", o.out, want)
	}
	t.Setenv("PWD", "relative/nonsense")
	o, err = parseFlags([]string{"-version", "0.1.0", "-out", "dist"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	wd, _ := os.Getwd()
	if want := filepath.Join(wd, "dist"); o.out != want {
		t.Errorf("out %q with a bad $PWD, want %q", o.out, want)
	}
}

// TestRunUsage checks the command's exit status and messages for bad
// usage and -help; it builds nothing.
func TestRunUsage(t *testing.T) {
	for _, tc := range []struct {
		args       []string
		code       int
		out, errIn string
	}{
		{args: []string{"-help"}, code: 0, out: "Usage: go -C packaging run . -version VERSION"},
		{args: nil, code: 2, errIn: "packaging: -version is required"},
		{args: []string{"-version", "x"}, code: 2, errIn: `packaging: malformed -version "x"`},
	} {
		var out, errb bytes.Buffer
		code := run(context.Background(), tc.args, &out, &errb)
		if code != tc.code || !strings.Contains(out.String(), tc.out) || !strings.Contains(errb.String(), tc.errIn) {
			t.Errorf("run %q: exit %d, stdout %q, stderr %q; want %d, %q, %q", tc.args, code, out.String(), errb.String(), tc.code, tc.out, tc.errIn)
		}
	}
}

func TestPackageFileNames(t *testing.T) {
	for _, tc := range []struct{ version, arch, deb, rpm string }{
		{"0.1.0", "amd64", "gorolling_0.1.0_amd64.deb", "gorolling-0.1.0.x86_64.rpm"},
		{"1.2.0-rc.1", "arm64", "gorolling_1.2.0~rc.1_arm64.deb", "gorolling-1.2.0~rc.1.aarch64.rpm"},
	} {
		deb, rpm := packageFileNames(tc.version, tc.arch)
		if deb != tc.deb || rpm != tc.rpm {
			t.Errorf("packageFileNames(%q, %q) = %q, %q; want %q, %q", tc.version, tc.arch, deb, rpm, tc.deb, tc.rpm)
		}
	}
}

func TestDebCopyright(t *testing.T) {
	lic := "MIT License\n\nCopyright (c) 2026 The gorolling authors\n\nPermission is hereby granted, free of charge,\nto any person.\n\nTHE SOFTWARE IS PROVIDED \"AS IS\".\n"
	c := string(debCopyright([]byte(lic)))
	for _, want := range []string{
		"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n",
		"\nCopyright: 2026 The gorolling authors\n",
		"\nLicense: Expat\n Permission is hereby granted",
		"\n .\n THE SOFTWARE IS PROVIDED",
	} {
		if !strings.Contains(c, want) {
			t.Errorf("copyright lacks %q:\n%s", want, c)
		}
	}
	for i, l := range strings.Split(strings.TrimSuffix(c, "\n"), "\n") {
		if l == "" && i < 5 {
			continue // the blank line between the header and the Files paragraph
		}
		if l == "" {
			t.Errorf("line %d is empty: a blank line ends a DEP-5 paragraph", i+1)
		}
	}
}
