package main

import (
	"strconv"
	"strings"
	"testing"
	"time"
)

// unitSettings parses a unit file into section.key -> values.
func unitSettings(text string) map[string][]string {
	m := map[string][]string{}
	section := ""
	for _, l := range strings.Split(text, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "" || strings.HasPrefix(l, "#") || strings.HasPrefix(l, ";"):
		case strings.HasPrefix(l, "[") && strings.HasSuffix(l, "]"):
			section = strings.Trim(l, "[]")
		default:
			k, v, _ := strings.Cut(l, "=")
			m[section+"."+k] = append(m[section+"."+k], v)
		}
	}
	return m
}

// TestUnitFile pins the settings the master's behaviour depends on;
// systemd-analyze verify (TestDebInstallRunRemove) checks the syntax.
func TestUnitFile(t *testing.T) {
	b, err := assets.ReadFile("files/gorolling@.service")
	if err != nil {
		t.Fatal(err)
	}
	s := unitSettings(string(b))
	for key, want := range map[string]string{
		"Service.Type":                     "notify",
		"Service.NotifyAccess":             "main",
		"Service.EnvironmentFile":          "/etc/gorolling/%i.conf",
		"Service.ExecStart":                "/usr/bin/gorolling exec --name %i --fd-store=on $OPTIONS -- $COMMAND",
		"Service.ExecReload":               "/usr/bin/gorolling upgrade --wait --name %i",
		"Service.KillMode":                 "control-group",
		"Service.Restart":                  "on-failure",
		"Service.RestartSec":               "100ms",
		"Service.FileDescriptorStoreMax":   "4096",
		"Service.WatchdogSec":              "30s",
		"Service.RuntimeDirectory":         "gorolling",
		"Service.RuntimeDirectoryPreserve": "yes",
		"Service.RuntimeDirectoryMode":     "0700",
		"Service.NoNewPrivileges":          "yes",
		"Service.ProtectSystem":            "full",
		"Service.PrivateTmp":               "yes",
		"Service.ProtectKernelTunables":    "yes",
		"Service.ProtectControlGroups":     "yes",
		"Install.WantedBy":                 "multi-user.target",
	} {
		if got := s[key]; len(got) != 1 || got[0] != want {
			t.Errorf("%s = %q, want exactly %q", key, got, want)
		}
	}
	stop, err := time.ParseDuration(strings.Join(s["Service.TimeoutStopSec"], "") + "s")
	if err != nil || stop < 60*time.Second {
		t.Errorf("TimeoutStopSec %q: want at least 60s, well above the 30s default drain timeout", s["Service.TimeoutStopSec"])
	}
	if n, err := strconv.Atoi(strings.Join(s["Service.LimitNOFILE"], "")); err != nil || n < 4096 {
		t.Errorf("LimitNOFILE %q: want a number of at least 4096", s["Service.LimitNOFILE"])
	}
	// The master must stay root: privileged ports, workers as other users.
	for _, key := range []string{"Service.User", "Service.DynamicUser", "Service.CapabilityBoundingSet", "Service.PrivateUsers"} {
		if v, ok := s[key]; ok {
			t.Errorf("%s = %q: the master needs root's capabilities", key, v)
		}
	}
}

// TestExampleConfig checks the example config has the documented shape.
func TestExampleConfig(t *testing.T) {
	b, err := assets.ReadFile("files/myapp.conf")
	if err != nil {
		t.Fatal(err)
	}
	vars := exampleVars(string(b))
	if vars["OPTIONS"] != "--workers 4 --drain-timeout 30s" || vars["COMMAND"] != "/usr/local/bin/myapp --port 8080" {
		t.Errorf("example variables %q", vars)
	}
	if len(vars) != 2 {
		t.Errorf("example sets %d variables, want OPTIONS and COMMAND only", len(vars))
	}
}

// exampleVars returns the VARIABLE=value lines of an EnvironmentFile.
func exampleVars(text string) map[string]string {
	vars := map[string]string{}
	for _, l := range strings.Split(text, "\n") {
		if l = strings.TrimSpace(l); l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if k, v, ok := strings.Cut(l, "="); ok {
			vars[k] = v
		}
	}
	return vars
}
