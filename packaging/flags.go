package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
)

// mainModule is the module path of the repository whose binary is packaged.
const mainModule = "github.com/gorolling/gorolling"

// options are the builder's validated flags.
type options struct {
	version    string // MAJOR.MINOR.PATCH[-PRERELEASE], no leading "v"
	arch       string // GOARCH of the packaged binary
	out        string // absolute directory the packages are written to
	root       string // absolute path of the repository root
	maintainer string // "Name <email>"
}

// archs maps the GOARCH values the builder accepts to the architecture
// names of Debian and RPM.
var archs = map[string]struct{ deb, rpm string }{
	"amd64":   {"amd64", "x86_64"},
	"arm64":   {"arm64", "aarch64"},
	"386":     {"i386", "i386"},
	"ppc64le": {"ppc64el", "ppc64le"},
	"s390x":   {"s390x", "s390x"},
	"riscv64": {"riscv64", "riscv64"},
}

// versionRE is a semantic version without build metadata. Prerelease
// identifiers are restricted to letters, digits and dots so that the
// same string is a valid Debian and RPM version once "-" becomes "~".
var versionRE = regexp.MustCompile(`^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z]+(\.[0-9A-Za-z]+)*)?$`)

const defaultMaintainer = "The gorolling authors <gorolling@users.noreply.github.com>"

// parseFlags parses and checks the command line. Help goes to usageOut;
// it returns flag.ErrHelp after printing it.
func parseFlags(args []string, usageOut io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("packaging", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.version, "version", "", "package `version`: MAJOR.MINOR.PATCH with an optional -PRERELEASE (e.g. 0.1.0, 1.2.0-rc.1); a leading \"v\" is dropped (required)")
	fs.StringVar(&o.arch, "arch", runtime.GOARCH, "GOARCH to build for: "+strings.Join(archNames(), ", "))
	fs.StringVar(&o.out, "out", "dist", "`directory` to write the packages to; a relative path is taken from the directory the command was started in ($PWD, which \"go -C\" leaves alone)")
	fs.StringVar(&o.root, "root", "", "repository `root` (default: the nearest parent directory whose go.mod is module "+mainModule+")")
	fs.StringVar(&o.maintainer, "maintainer", defaultMaintainer, "package maintainer, \"Name <email>\"")
	fs.Usage = func() {
		fmt.Fprintf(usageOut, "Usage: go -C packaging run . -version VERSION [flags]\n\nBuilds gorolling_VERSION_ARCH.deb and gorolling-VERSION.ARCH.rpm.\n\nFlags:\n")
		fs.SetOutput(usageOut)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.Usage()
		}
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}

	var err error
	if o.version, err = checkVersion(o.version); err != nil {
		return o, err
	}
	if _, ok := archs[o.arch]; !ok {
		return o, fmt.Errorf("unsupported -arch %q: want one of %s", o.arch, strings.Join(archNames(), ", "))
	}
	if !maintainerRE.MatchString(o.maintainer) {
		return o, fmt.Errorf("malformed -maintainer %q: want \"Name <email>\"", o.maintainer)
	}
	if o.out == "" {
		return o, errors.New("-out is empty: give a directory")
	}
	if !filepath.IsAbs(o.out) {
		dir, err := invocationDir()
		if err != nil {
			return o, fmt.Errorf("resolve -out %q: %w", o.out, err)
		}
		o.out = filepath.Join(dir, o.out)
	}
	o.out = filepath.Clean(o.out)
	if o.root, err = findRoot(o.root); err != nil {
		return o, err
	}
	return o, nil
}

var maintainerRE = regexp.MustCompile(`^[^<>\n]+ <[^<>@\s]+@[^<>@\s]+>$`)

// checkVersion validates a -version value and returns it without a
// leading "v".
func checkVersion(v string) (string, error) {
	if v == "" {
		return "", errors.New("-version is required, e.g. -version 0.1.0")
	}
	s := strings.TrimPrefix(v, "v")
	if !versionRE.MatchString(s) {
		return "", fmt.Errorf("malformed -version %q: want MAJOR.MINOR.PATCH with an optional -PRERELEASE of letters, digits and dots, e.g. 0.1.0 or 1.2.0-rc.1", v)
	}
	return s, nil
}

func archNames() []string {
	var names []string
	for a := range archs {
		names = append(names, a)
	}
	sort.Strings(names)
	return names
}

// invocationDir is the directory the command was started from: $PWD
// when it names a directory ("go -C DIR run" changes the working
// directory but not $PWD), else the working directory.
func invocationDir() (string, error) {
	if pwd := os.Getenv("PWD"); filepath.IsAbs(pwd) {
		if fi, err := os.Stat(pwd); err == nil && fi.IsDir() {
			return pwd, nil
		}
	}
	return os.Getwd()
}

// findRoot returns the absolute repository root: dir if given (it must
// hold the main module's go.mod), else the nearest directory at or above
// the working directory that does.
func findRoot(dir string) (string, error) {
	if dir != "" {
		abs, err := filepath.Abs(dir)
		if err != nil {
			return "", fmt.Errorf("resolve -root %q: %w", dir, err)
		}
		if mod, err := modulePath(filepath.Join(abs, "go.mod")); err != nil || mod != mainModule {
			return "", fmt.Errorf("-root %q: no go.mod for module %s there", dir, mainModule)
		}
		return abs, nil
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find the repository root: %w", err)
	}
	for d := wd; ; d = filepath.Dir(d) {
		if mod, err := modulePath(filepath.Join(d, "go.mod")); err == nil && mod == mainModule {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("find the repository root: no go.mod for module %s at or above %s; run from the repository or pass -root", mainModule, wd)
		}
	}
}

// modulePath returns the module path a go.mod file declares.
func modulePath(gomod string) (string, error) {
	f, err := os.Open(gomod)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "module" {
			return strings.Trim(fields[1], "\"`"), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", fmt.Errorf("%s: no module line", gomod)
}

// pkgVersion turns a checked semantic version into the version string of
// both formats: "1.2.0-rc.1" becomes "1.2.0~rc.1", which Debian and RPM
// sort before "1.2.0".
func pkgVersion(v string) string { return strings.Replace(v, "-", "~", 1) }

// splitVersion splits a checked semantic version into its release and
// prerelease parts.
func splitVersion(v string) (release, prerelease string) {
	release, prerelease, _ = strings.Cut(v, "-")
	return release, prerelease
}

// packageFileNames returns the .deb and .rpm file names for a version and
// GOARCH.
func packageFileNames(version, goarch string) (deb, rpm string) {
	a := archs[goarch]
	return fmt.Sprintf("gorolling_%s_%s.deb", pkgVersion(version), a.deb),
		fmt.Sprintf("gorolling-%s.%s.rpm", pkgVersion(version), a.rpm)
}
