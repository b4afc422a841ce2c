package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/goreleaser/nfpm/v2"
	"github.com/goreleaser/nfpm/v2/deb"
	"github.com/goreleaser/nfpm/v2/files"
	"github.com/goreleaser/nfpm/v2/rpm"
)

// assets are the unit, the example config and the maintainer scripts.
//
//go:embed files scripts
var assets embed.FS

// Where the packages install things.
const (
	binPath     = "/usr/bin/gorolling"
	unitPath    = "/usr/lib/systemd/system/gorolling@.service"
	docDir      = "/usr/share/doc/gorolling"
	examplePath = docDir + "/examples/myapp.conf"
	manPath     = "/usr/share/man/man1/gorolling.1.gz"
)

const (
	homepage = "https://github.com/gorolling/gorolling"
	summary  = "zero-downtime deploys: workers sharing listening sockets"
	longDesc = `gorolling runs a program as N worker processes under a long-lived master
that owns the listening sockets, and on reload replaces the workers with a
new generation from the binary on disk without refusing or dropping a
connection. The package ships the gorolling command and a systemd template
unit, gorolling@.service, that runs one master per service configured in
/etc/gorolling/NAME.conf.`
)

// staged are the files a package is made of, in the staging directory.
type staged struct {
	bin, man, unit, example, license, copyright string
	readme                                      string // "" when the repository has none
	scripts                                     map[string]string
}

// buildPackages builds the binary and the man page in a temporary
// directory, packages them and returns the paths of the .deb and the
// .rpm. Progress goes to log. The temporary directory is removed in all
// cases; a package is written under a temporary name and renamed, so a
// failed build leaves no partial package in o.out.
func buildPackages(ctx context.Context, o options, log io.Writer) ([]string, error) {
	stage, err := os.MkdirTemp("", "gorolling-packaging-")
	if err != nil {
		return nil, fmt.Errorf("create staging directory: %w", err)
	}
	defer os.RemoveAll(stage)
	st, err := stageFiles(ctx, o, stage, log)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return nil, fmt.Errorf("create output directory: %w", err)
	}
	debName, rpmName := packageFileNames(o.version, o.arch)
	var paths []string
	for _, p := range []struct {
		format, name string
		packager     nfpm.Packager
	}{
		{"deb", debName, deb.Default},
		{"rpm", rpmName, rpm.DefaultRPM},
	} {
		path := filepath.Join(o.out, p.name)
		fmt.Fprintf(log, "writing %s\n", path)
		if err := writePackage(p.packager, packageInfo(p.format, o, st), path); err != nil {
			return nil, err
		}
		paths = append(paths, path)
	}
	return paths, nil
}

// stageFiles builds and writes every file the packages contain into dir.
func stageFiles(ctx context.Context, o options, dir string, log io.Writer) (staged, error) {
	st := staged{
		bin:       filepath.Join(dir, "gorolling"),
		man:       filepath.Join(dir, "gorolling.1.gz"),
		unit:      filepath.Join(dir, "gorolling@.service"),
		example:   filepath.Join(dir, "myapp.conf"),
		license:   filepath.Join(o.root, "LICENSE"),
		copyright: filepath.Join(dir, "copyright"),
		scripts:   map[string]string{},
	}
	fmt.Fprintf(log, "building gorolling %s for linux/%s\n", o.version, o.arch)
	if err := goBuild(ctx, o.root, "linux", o.arch, o.version, st.bin); err != nil {
		return st, err
	}
	manBin := st.bin
	if runtime.GOOS != "linux" || runtime.GOARCH != o.arch {
		// The man page comes from running the binary: build one that runs here.
		manBin = filepath.Join(dir, "gorolling-host")
		if err := goBuild(ctx, o.root, runtime.GOOS, runtime.GOARCH, o.version, manBin); err != nil {
			return st, err
		}
	}
	if err := writeManPage(ctx, manBin, st.man); err != nil {
		return st, err
	}

	for src, dst := range map[string]string{
		"files/gorolling@.service": st.unit,
		"files/myapp.conf":         st.example,
	} {
		b, err := assets.ReadFile(src)
		if err != nil {
			return st, fmt.Errorf("read embedded %s: %w", src, err)
		}
		if err := os.WriteFile(dst, b, 0o644); err != nil {
			return st, fmt.Errorf("stage %s: %w", src, err)
		}
	}

	license, err := os.ReadFile(st.license)
	if err != nil {
		return st, fmt.Errorf("read the license: %w", err)
	}
	if err := os.WriteFile(st.copyright, debCopyright(license), 0o644); err != nil {
		return st, fmt.Errorf("stage the Debian copyright file: %w", err)
	}
	readme := filepath.Join(o.root, "README.md")
	if _, err := os.Stat(readme); err == nil {
		st.readme = readme
	} else if errors.Is(err, fs.ErrNotExist) {
		fmt.Fprintf(log, "warning: %s does not exist; the packages ship without it\n", readme)
	} else {
		return st, fmt.Errorf("stat the README: %w", err)
	}

	for format, names := range scriptNames {
		for _, name := range names {
			b, err := renderScript(format, name, installedPaths)
			if err != nil {
				return st, err
			}
			path := filepath.Join(dir, format+"-"+name)
			if err := os.WriteFile(path, b, 0o755); err != nil {
				return st, fmt.Errorf("stage %s script %q: %w", format, name, err)
			}
			st.scripts[format+"/"+name] = path
		}
	}
	return st, nil
}

// goBuild builds cmd/gorolling of the repository at root into out: static,
// stripped, trimmed paths, version stamped.
func goBuild(ctx context.Context, root, goos, goarch, version, out string) error {
	goCmd, err := goTool()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, goCmd, "build", "-trimpath",
		"-ldflags", "-s -w -X main.version="+version,
		"-o", out, "./cmd/gorolling")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+goos, "GOARCH="+goarch)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("build gorolling for %s/%s: %w\n%s", goos, goarch, err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// goTool finds the go command: in PATH, else in $GOROOT/bin.
func goTool() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	if root := os.Getenv("GOROOT"); root != "" {
		p := filepath.Join(root, "bin", "go")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("find the go command: not in PATH, and $GOROOT/bin/go does not exist")
}

// writeManPage runs "BIN man" and writes its output gzipped to out.
func writeManPage(ctx context.Context, bin, out string) error {
	cmd := exec.CommandContext(ctx, bin, "man")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("render the man page with %q: %w\n%s", "gorolling man", err, strings.TrimSpace(stderr.String()))
	}
	if !bytes.HasPrefix(stdout.Bytes(), []byte(".TH ")) {
		return fmt.Errorf("render the man page: %q printed no roff page (%d bytes)", "gorolling man", stdout.Len())
	}
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if err != nil {
		return fmt.Errorf("compress the man page: %w", err)
	}
	// The header has no name and no time: the same page gives the same bytes.
	if _, err := zw.Write(stdout.Bytes()); err != nil {
		return fmt.Errorf("compress the man page: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("compress the man page: %w", err)
	}
	if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("stage the man page: %w", err)
	}
	return nil
}

// debCopyright renders the MIT license as a machine-readable
// debian/copyright file (DEP-5; Debian calls the license "Expat").
func debCopyright(license []byte) []byte {
	holder := "The gorolling authors"
	lines := strings.Split(strings.ReplaceAll(string(license), "\r\n", "\n"), "\n")
	body := lines
	for i, l := range lines {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(l), "Copyright"); ok {
			rest = strings.TrimSpace(rest)
			for _, p := range []string{"(c)", "(C)", "©"} {
				rest = strings.TrimSpace(strings.TrimPrefix(rest, p))
			}
			if rest != "" {
				holder = rest
			}
			body = lines[i+1:]
			break
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: gorolling\nSource: %s\n\nFiles: *\nCopyright: %s\nLicense: Expat\n", homepage, holder)
	text := strings.Trim(strings.Join(body, "\n"), "\n ")
	for _, l := range strings.Split(text, "\n") {
		if strings.TrimSpace(l) == "" {
			b.WriteString(" .\n")
		} else {
			b.WriteString(" " + strings.TrimRight(l, " \t") + "\n")
		}
	}
	return []byte(b.String())
}

// packageInfo describes the package of one format ("deb" or "rpm").
func packageInfo(format string, o options, st staged) *nfpm.Info {
	release, pre := splitVersion(o.version)
	file := func(src, dst string, mode os.FileMode) *files.Content {
		return &files.Content{Source: src, Destination: dst, FileInfo: &files.ContentFileInfo{Owner: "root", Group: "root", Mode: mode}}
	}
	contents := files.Contents{
		file(st.bin, binPath, 0o755),
		file(st.unit, unitPath, 0o644),
		file(st.example, examplePath, 0o644),
		file(st.man, manPath, 0o644),
	}
	info := &nfpm.Info{
		Name:          "gorolling",
		Platform:      "linux",
		Version:       release,
		Prerelease:    pre,
		VersionSchema: "none",
		Section:       "admin",
		Priority:      "optional",
		Maintainer:    o.maintainer,
		Description:   summary + "\n" + longDesc,
		Vendor:        "gorolling",
		Homepage:      homepage,
		License:       "MIT",
	}
	info.Recommends = []string{"systemd"}
	a := archs[o.arch]
	switch format {
	case "deb":
		info.Arch = a.deb
		contents = append(contents,
			file(st.license, docDir+"/LICENSE", 0o644),
			file(st.copyright, docDir+"/copyright", 0o644))
		if st.readme != "" {
			contents = append(contents, file(st.readme, docDir+"/README.md", 0o644))
		}
		info.Scripts = nfpm.Scripts{
			PostInstall: st.scripts["deb/postinst"],
			PreRemove:   st.scripts["deb/prerm"],
			PostRemove:  st.scripts["deb/postrm"],
		}
	case "rpm":
		info.Arch = a.rpm
		info.RPM = nfpm.RPM{Group: "Applications/System", Summary: summary, Packager: o.maintainer}
		info.Description = longDesc // rpm shows Summary apart
		lic := file(st.license, docDir+"/LICENSE", 0o644)
		lic.Type = files.TypeRPMLicense
		contents = append(contents, lic)
		if st.readme != "" {
			doc := file(st.readme, docDir+"/README.md", 0o644)
			doc.Type = files.TypeRPMDoc
			contents = append(contents, doc)
		}
		// rpm removes only directories a package owns.
		for _, d := range []string{docDir, docDir + "/examples"} {
			contents = append(contents, &files.Content{Destination: d, Type: files.TypeDir,
				FileInfo: &files.ContentFileInfo{Owner: "root", Group: "root", Mode: 0o755}})
		}
		info.Scripts = nfpm.Scripts{
			PostInstall: st.scripts["rpm/post"],
			PreRemove:   st.scripts["rpm/preun"],
			PostRemove:  st.scripts["rpm/postun"],
		}
	}
	info.Contents = contents
	return nfpm.WithDefaults(info)
}

// writePackage writes one package to path, through a temporary file in
// the same directory.
func writePackage(p nfpm.Packager, info *nfpm.Info, path string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // after the rename, there is nothing to remove
	if err := p.Package(info, tmp); err != nil {
		tmp.Close()
		return fmt.Errorf("package %s: %w", filepath.Base(path), err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
