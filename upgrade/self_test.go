package upgrade

import (
	"encoding/json"
	"testing"
)

// TestBundleStateFromAnOlderMaster: the state an older master wrote (its
// registry's fields and its counters at the top level, the control socket
// marked in the socket list) is what a newer one reads.
func TestBundleStateFromAnOlderMaster(t *testing.T) {
	old := `{"last_generation":3,"last_worker_id":12,"service_started":"2026-11-30T10:00:00Z","master_upgrades":2,
"sockets":[{"key":{"Network":"tcp4","Address":"127.0.0.1:0","Packet":false,"Index":0},"network":"tcp","addr":"127.0.0.1:4000","preopen_index":-1},
{"key":{"Network":"unix","Address":"/run/app.sock","Packet":false,"Index":0},"network":"unix","addr":"/run/app.sock","preopen_index":0,"persistent":true,"path":"/run/app.sock","ino":77},
{"key":{"Network":"","Address":"","Packet":false,"Index":0},"network":"unix","addr":"/run/gorolling/x.sock","path":"/run/gorolling/x.sock","preopen_index":-1,"control":true}],
"ports":[{"key":{"Network":"tcp4","Address":"127.0.0.1:0","Packet":false,"Index":0},"port":4000}]}`
	var st bundleState
	if err := json.Unmarshal([]byte(old), &st); err != nil {
		t.Fatal(err)
	}
	if st.LastGeneration != 3 || st.LastWorkerID != 12 || st.MasterUpgrades != 2 || len(st.Sockets) != 3 || len(st.Ports) != 1 {
		t.Fatalf("decoded %+v", st)
	}
	if s := st.Sockets[1]; s.Path != "/run/app.sock" || s.Ino != 77 || s.PreopenIndex != 0 || !s.Persistent || s.Control {
		t.Fatalf("the --listen socket decoded as %+v", s)
	}
	if !st.Sockets[2].Control || st.Ports[0].Port != 4000 {
		t.Fatalf("control mark or port lost: %+v %+v", st.Sockets[2], st.Ports[0])
	}
	// And what this master writes reads back the same.
	b, _ := json.Marshal(st)
	var again bundleState
	if err := json.Unmarshal(b, &again); err != nil || len(again.Sockets) != 3 || !again.Sockets[2].Control || again.Sockets[1].Ino != 77 {
		t.Fatalf("round trip: %v %+v", err, again)
	}
}
