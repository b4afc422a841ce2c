package sdnotify

import (
	"errors"
	"fmt"
	"sort"
	"sync"

	"golang.org/x/sys/unix"
)

// Store keeps named descriptors in the service manager's file descriptor
// store (FDSTORE=1 with FDNAME=). systemd holds a duplicate of each for the
// service, however often its main process dies, until the service stops,
// and passes them to the next main process through LISTEN_FDS and
// LISTEN_FDNAMES. A listening socket in the store keeps its port and its
// queue of connections while no process of the service holds it.
//
// The protocol has no answers: a message the manager refuses (the store is
// full, or the sender is not the main process) is lost without a word. The
// Store therefore remembers what it sent, and sends only changes: a name
// it holds for another descriptor is replaced, a name no longer wanted is
// removed (FDSTOREREMOVE=1). systemd ignores a descriptor it holds
// already, under whatever name, so sending one twice is harmless.
//
// Its methods are safe for concurrent use.
type Store struct {
	n   *Notifier
	max int // 0: unknown

	mu     sync.Mutex
	held   map[string]identity // name -> what the store holds, as far as we know
	blobs  map[string]int      // memfds this process made, by name
	full   bool                // the "store full" error was returned once
	sealed bool                // another process keeps the store now (see Seal)
}

// Held is a name the store holds and the identity of its descriptor: what
// a master hands its successor so that the successor's first Sync removes
// what the predecessor stored and the successor no longer wants.
type Held struct {
	Name string `json:"name"`
	Dev  uint64 `json:"dev"`
	Ino  uint64 `json:"ino"`
}

// Entry is one descriptor to keep under a name.
type Entry struct {
	Name string
	FD   int
}

// identity tells two descriptors of the same open file apart from two
// different files: a socket's inode is its own.
type identity struct{ dev, ino uint64 }

func identify(fd int) (identity, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return identity{}, err
	}
	return identity{uint64(st.Dev), st.Ino}, nil
}

// NewStore returns a store that speaks through n and keeps at most max
// descriptors (FileDescriptorStoreMax=; 0 if unknown).
func NewStore(n *Notifier, max int) (*Store, error) {
	if n == nil {
		return nil, errNoNotifier
	}
	return &Store{n: n, max: max, held: map[string]identity{}, blobs: map[string]int{}}, nil
}

// Assume records that the store holds fd under name already: the
// descriptor came back from it through LISTEN_FDS.
func (s *Store) Assume(name string, fd int) {
	id, err := identify(fd)
	if err != nil {
		return
	}
	s.mu.Lock()
	s.held[name] = id
	s.mu.Unlock()
}

// Seal stops this process from changing the store and returns what it
// holds, for a successor (AssumeHeld): from here on the successor keeps
// the store, and a Sync or PutBlob here does nothing, so nothing is stored
// that the successor would not know to remove. Unseal undoes it when the
// successor failed.
func (s *Store) Seal() []Held {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sealed = true
	out := make([]Held, 0, len(s.held))
	for name, id := range s.held {
		out = append(out, Held{Name: name, Dev: id.dev, Ino: id.ino})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Unseal lets this process keep the store again after Seal.
func (s *Store) Unseal() {
	s.mu.Lock()
	s.sealed = false
	s.mu.Unlock()
}

// AssumeHeld records what a predecessor's store held (its Seal). Names
// with ValidName errors are ignored: they cannot be in systemd's store.
func (s *Store) AssumeHeld(held []Held) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, h := range held {
		if ValidName(h.Name) == nil {
			s.held[h.Name] = identity{h.Dev, h.Ino}
		}
	}
}

// Forget removes name from the store, whatever it holds under it: for an
// entry this process does not understand (a newer master's).
func (s *Store) Forget(name string) error {
	if err := ValidName(name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.held, name)
	return s.n.Notify("FDSTOREREMOVE=1\nFDNAME=" + name)
}

// Clear removes everything the store holds, blobs too, and seals it: for
// the service's final stop, after which nothing of this run must come
// back. systemd keeps a store across "systemctl restart" (a job is
// queued), and a restart must start afresh, with the flags' settings and
// with socket files bound again (the stop removed them).
func (s *Store) Clear() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sealed = true
	names := make([]string, 0, len(s.held))
	for name := range s.held {
		names = append(names, name)
	}
	sort.Strings(names)
	var errs []error
	for _, name := range names {
		if err := s.n.Notify("FDSTOREREMOVE=1\nFDNAME=" + name); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(s.held, name)
	}
	for name, fd := range s.blobs {
		unix.Close(fd)
		delete(s.blobs, name)
	}
	return errors.Join(errs...)
}

// ErrStoreFull is returned (wrapped, once) by Sync when the descriptors
// wanted exceed the store's size: the ones past it are not kept.
var ErrStoreFull = errors.New("the fd store is full")

// Sync makes the store hold exactly want, blobs aside: entries whose name
// it does not hold for the same descriptor are stored, and names it holds
// that want lacks are removed. It returns how many it stored and removed.
// Entries with a name systemd would refuse are skipped and reported.
func (s *Store) Sync(want []Entry) (added, removed int, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sealed {
		return 0, 0, nil
	}
	wanted := make(map[string]bool, len(want))
	var errs []error
	for _, e := range want {
		wanted[e.Name] = true
	}
	var gone []string
	for name := range s.held {
		if _, blob := s.blobs[name]; !blob && !wanted[name] {
			gone = append(gone, name)
		}
	}
	sort.Strings(gone)
	for _, name := range gone {
		if err := s.n.Notify("FDSTOREREMOVE=1\nFDNAME=" + name); err != nil {
			return added, removed, err
		}
		delete(s.held, name)
		removed++
	}
	for _, e := range want {
		if err := ValidName(e.Name); err != nil {
			errs = append(errs, err)
			continue
		}
		id, err := identify(e.FD)
		if err != nil {
			errs = append(errs, fmt.Errorf("fd store %q: %w", e.Name, err))
			continue
		}
		cur, ok := s.held[e.Name]
		if ok && cur == id {
			continue
		}
		if ok {
			// Another socket under the same name (one closed and opened
			// again between two syncs): drop the stale one first.
			if err := s.n.Notify("FDSTOREREMOVE=1\nFDNAME=" + e.Name); err != nil {
				return added, removed, err
			}
			delete(s.held, e.Name)
			removed++
		}
		if s.max > 0 && len(s.held) >= s.max {
			if !s.full {
				s.full = true
				errs = append(errs, fmt.Errorf("%w: it holds %d descriptors (FileDescriptorStoreMax=%d); the others are not kept across a restart", ErrStoreFull, len(s.held), s.max))
			}
			continue
		}
		if err := s.n.Send("FDSTORE=1\nFDNAME="+e.Name, []int{e.FD}); err != nil {
			return added, removed, err
		}
		s.held[e.Name] = id
		added++
	}
	return added, removed, errors.Join(errs...)
}

// PutBlob keeps data in the store under name, in a memory file
// (memfd_create(2)) that systemd holds like any descriptor: a small
// document that survives the process. The first call for a name replaces
// whatever the store held under it (a predecessor's copy); later calls
// rewrite the same file in place, which systemd's duplicate sees, so they
// send nothing. ReadBlob reads it back.
func (s *Store) PutBlob(name string, data []byte) error {
	if err := ValidName(name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sealed {
		return nil
	}
	if fd, ok := s.blobs[name]; ok {
		return writeBlob(fd, data)
	}
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fd store %q: memfd: %w", name, err)
	}
	if err := writeBlob(fd, data); err != nil {
		unix.Close(fd)
		return err
	}
	if err := s.n.Notify("FDSTOREREMOVE=1\nFDNAME=" + name); err != nil {
		unix.Close(fd)
		return err
	}
	if err := s.n.Send("FDSTORE=1\nFDNAME="+name, []int{fd}); err != nil {
		unix.Close(fd)
		return err
	}
	s.blobs[name] = fd
	if id, err := identify(fd); err == nil {
		s.held[name] = id
	}
	return nil
}

// writeBlob replaces the file's content. The new content is written over
// the old before the file is cut to its length, so a reader never sees a
// prefix of it: at worst (a process killed between the two calls) the old
// content's tail follows the new, which ReadBlob's JSON callers ignore.
func writeBlob(fd int, data []byte) error {
	if _, err := unix.Pwrite(fd, data, 0); err != nil {
		return fmt.Errorf("fd store: write memfd: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(len(data))); err != nil {
		return fmt.Errorf("fd store: truncate memfd: %w", err)
	}
	return nil
}

// maxBlob bounds what ReadBlob reads.
const maxBlob = 1 << 20

// ReadBlob reads a blob PutBlob wrote, from a descriptor that came back
// through LISTEN_FDS. It does not close fd.
func ReadBlob(fd int) ([]byte, error) {
	var out []byte
	buf := make([]byte, 64<<10)
	for off := int64(0); off < maxBlob; {
		n, err := unix.Pread(fd, buf, off)
		if err != nil {
			return nil, fmt.Errorf("fd store: read memfd: %w", err)
		}
		if n == 0 {
			return out, nil
		}
		out = append(out, buf[:n]...)
		off += int64(n)
	}
	return nil, fmt.Errorf("fd store: blob larger than %d bytes", maxBlob)
}

// ValidName checks a name as systemd checks FDNAME= and LISTEN_FDNAMES
// entries: 1 to 255 printable ASCII characters, no ':' (the separator of
// LISTEN_FDNAMES).
func ValidName(name string) error {
	if name == "" || len(name) > 255 {
		return fmt.Errorf("fd store name %q: want 1 to 255 characters, got %d", name, len(name))
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < 0x20 || c > 0x7e || c == ':' {
			return fmt.Errorf("fd store name %q: character %q is not allowed", name, c)
		}
	}
	return nil
}

// Count returns how many descriptors, blobs aside, the store holds as far
// as this process knows.
func (s *Store) Count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.held) - len(s.blobs)
}
