/*
 * replyx.js — the ReplyX realtime client for browsers. No dependencies.
 *
 * A Dialog is one WebSocket on one dialog. It keeps the last message seq it
 * delivered, and when the socket drops (gateway restart: 1012, slow client:
 * 4008, network) it reconnects with backoff and ?since=<last seq>: the gateway
 * replays what was missed, so every message reaches the page exactly once and
 * in order. Close codes that no retry can fix (4001 bad token, 4003 origin,
 * 4004 dialog, 4400, 1008, 1009) end it with a 'closed' event.
 *
 *   var dialog = new ReplyX.Dialog({
 *     url: ReplyX.wsUrl('/ws/widget/dialogs/7', {assistant_id: 3, guest_token: token}),
 *     since: 0                                  // 0: the whole history; null: from now on
 *   });
 *   dialog.on('message', function (m) { ... }); // {type, dialog_id, seq, id, sender, text, created_at}
 *   dialog.on('typing', function (t) { ... });  // {type, dialog_id, sender}
 *   dialog.on('state', function (s) { ... });   // 'connecting' | 'live' | 'reconnecting' | 'closed'
 *   dialog.on('closed', function (e) { ... });  // gave up: {code, reason}
 *   dialog.connect();
 *
 * Messages and typing go out through the HTTP API (ReplyX.Api), never the socket.
 *
 * Transport: a Dialog uses a WebSocket first and falls back by itself to the
 * endpoint's server-sent events twin (/sse/… for /ws/…, EventSource) when the
 * upgrade fails (a proxy that blocks WebSockets) or the page has no WebSocket;
 * `transport: 'sse'` (or 'ws') forces one. The page sees the same events either
 * way. Over SSE each message carries its seq as the event id, so the browser's
 * own reconnect (after 1012, 4008 or a dropped connection) resumes with
 * Last-Event-ID; when the browser gives up (an HTTP error) the Dialog reconnects
 * itself with ?since=<last seq>, as it does for a socket.
 */
(function (global) {
  'use strict';

  var FATAL_CODES = {4001: 1, 4003: 1, 4004: 1, 4400: 1, 1008: 1, 1009: 1};

  function wsUrl(path, params) {
    var loc = global.location;
    var url = (loc.protocol === 'https:' ? 'wss://' : 'ws://') + loc.host + path;
    return url + query(params);
  }

  // The SSE twin of a socket URL: ws(s)://host/ws/… → http(s)://host/sse/…
  function sseUrl(url) {
    return url.replace(/^ws(s?):\/\//, 'http$1://').replace(/^(https?:\/\/[^\/]+)\/ws\//, '$1/sse/');
  }

  function query(params) {
    var parts = [];
    for (var key in params || {}) {
      if (params[key] !== null && params[key] !== undefined && params[key] !== '') {
        parts.push(encodeURIComponent(key) + '=' + encodeURIComponent(params[key]));
      }
    }
    return parts.length ? '?' + parts.join('&') : '';
  }

  // -- Dialog: one socket, resumed with since --------------------------------

  function Dialog(options) {
    this.url = options.url;
    this.lastSeq = options.since === undefined ? null : options.since;
    this.backoffInitial = options.backoffInitial || 500;   // ms
    this.backoffMax = options.backoffMax || 15000;
    this.pingEvery = options.pingEvery || 25000;           // app-level ping, for half-open sockets
    this.fatalCodes = options.fatalCodes || FATAL_CODES;
    // SSE fallback: 'auto' (WebSocket, then EventSource after a failed upgrade), 'ws' or 'sse'.
    this.transport = options.transport || 'auto';
    this.transportInUse = null;                            // 'ws' | 'sse' once connected
    this._useSse = this.transport === 'sse' ||
      (this.transport === 'auto' && typeof global.WebSocket !== 'function');
    this._sseWorked = false;
    this._wsWorked = false;
    this._es = null;
    this.state = 'idle';
    this.closeCodes = [];
    this.connects = 0;
    this._handlers = {};
    this._delay = this.backoffInitial;
    this._ws = null;
    this._timer = null;
    this._pinger = null;
    this._awaitingPong = false;
    this._stopped = false;
    var self = this;
    this._onOnline = function () { if (self.state === 'reconnecting') self._reconnectNow(); };
  }

  Dialog.prototype.on = function (event, handler) {
    (this._handlers[event] = this._handlers[event] || []).push(handler);
    return this;
  };

  Dialog.prototype._emit = function (event, a, b) {
    var handlers = this._handlers[event] || [];
    for (var i = 0; i < handlers.length; i++) {
      try { handlers[i](a, b); } catch (err) { setTimeout(function () { throw err; }); }
    }
  };

  Dialog.prototype._setState = function (state) {
    if (this.state !== state) {
      this.state = state;
      this._emit('state', state);
    }
  };

  Dialog.prototype.connect = function () {
    this._stopped = false;
    if (global.addEventListener) global.addEventListener('online', this._onOnline);
    this._open();
    return this;
  };

  Dialog.prototype.close = function () {
    this._stopped = true;
    clearTimeout(this._timer);
    this._stopPinger();
    if (global.removeEventListener) global.removeEventListener('online', this._onOnline);
    if (this._ws) this._ws.close(1000, 'bye');
    if (this._es) this._es.close();
    this._es = null;
    this._setState('closed');
  };

  Dialog.prototype._open = function () {
    if (this._useSse) return this._openSse();
    var self = this;
    var url = this.url;
    if (this.lastSeq !== null) url += (url.indexOf('?') >= 0 ? '&' : '?') + 'since=' + this.lastSeq;
    this._setState(this.connects === 0 ? 'connecting' : 'reconnecting');
    var ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      if (!this._canFallBack()) throw err;
      this._useSse = true;
      return this._openSse();
    }
    var opened = false;
    this._ws = ws;
    ws.onopen = function () {
      opened = self._wsWorked = true;
      self.transportInUse = 'ws';
      self.connects += 1;
    };
    ws.onmessage = function (event) {
      if (ws === self._ws) self._frame(ws, event.data);
    };
    ws.onclose = function (event) {
      if (ws !== self._ws) return;
      self._ws = null;
      self._stopPinger();
      self.closeCodes.push(event.code);
      if (self._stopped) return;
      if (!opened && !self._wsWorked && self._canFallBack()) {
        // No socket ever opened here: the upgrade may be blocked on this network. Try the
        // event stream at once (and stay on it once it works). Once a socket has worked,
        // a failure is an outage, not a blocked upgrade: keep retrying the socket.
        self._useSse = true;
        self._open();
        return;
      }
      if (self.fatalCodes[event.code]) {
        self._giveUp(event.code, event.reason);
        return;
      }
      self._setState('reconnecting');
      self._schedule();
    };
  };

  // A close no retry can fix: stop for good and say why.
  Dialog.prototype._giveUp = function (code, reason) {
    this._stopped = true;
    this._setState('closed');
    this._emit('closed', {code: code, reason: reason});
  };

  Dialog.prototype._schedule = function () {
    var self = this;
    var delay = this._delay * (0.8 + Math.random() * 0.4);
    this._delay = Math.min(this._delay * 2, this.backoffMax);
    clearTimeout(this._timer);
    this._timer = setTimeout(function () { self._open(); }, delay);
  };

  Dialog.prototype._reconnectNow = function () {
    clearTimeout(this._timer);
    this._delay = this.backoffInitial;
    this._open();
  };

  Dialog.prototype._frame = function (ws, raw) {
    var data;
    try { data = JSON.parse(raw); } catch (err) { return; }
    this._awaitingPong = false;
    if (data.type === 'message') {
      if (this.lastSeq !== null && data.seq <= this.lastSeq) return;  // already shown
      if (this.lastSeq !== null && data.seq !== this.lastSeq + 1) {
        // The gateway never skips a seq; should it ever, the replay of a resume fills it.
        if (ws) ws.close(1000, 'gap, resuming'); else this._restartSse();
        return;
      }
      this.lastSeq = data.seq;
      this._emit('message', data);
    } else if (data.type === 'typing') {
      this._emit('typing', data);
    } else if (data.type === 'read' || data.type === 'presence') {
      this._emit(data.type, data);  // workspace events: see "Workspace" below
    } else if (data.type === 'ready') {
      if (this.lastSeq === null) this.lastSeq = data.last_seq;
      this._delay = this.backoffInitial;
      if (ws) this._startPinger(ws);  // an event stream has no uplink: the server keeps it alive
      this._setState('live');
    }
  };

  // -- Dialog over server-sent events (the fallback) ---------------------------

  Dialog.prototype._canFallBack = function () {
    return this.transport === 'auto' && typeof global.EventSource === 'function';
  };

  Dialog.prototype._openSse = function () {
    var self = this;
    var url = sseUrl(this.url);
    if (this.lastSeq !== null) url += (url.indexOf('?') >= 0 ? '&' : '?') + 'since=' + this.lastSeq;
    this._setState(this.connects === 0 ? 'connecting' : 'reconnecting');
    if (this._es) this._es.close();  // 'online' while the browser was still retrying it
    var es = new EventSource(url);
    var opened = false;
    this._es = es;
    // Each (re)connection of this EventSource, the browser's own ones included.
    es.onopen = function () {
      if (es !== self._es) return;
      opened = true;
      self._sseWorked = true;
      self.transportInUse = 'sse';
      self.connects += 1;
    };
    es.onmessage = function (event) {
      if (es === self._es) self._frame(null, event.data);
    };
    // The gateway's close: {code, reason}, then the end of the stream.
    es.addEventListener('close', function (event) {
      if (es !== self._es) return;
      var info = {};
      try { info = JSON.parse(event.data); } catch (err) { /* keep {} */ }
      self.closeCodes.push(info.code);
      if (self.fatalCodes[info.code]) {
        es.close();
        self._es = null;
        self._giveUp(info.code, info.reason);
        return;
      }
      // 1012, 4008, 1013: the browser reconnects by itself and sends Last-Event-ID.
      self._setState('reconnecting');
    });
    es.onerror = function () {
      if (es !== self._es || self._stopped) return;
      self._setState('reconnecting');
      if (es.readyState !== EventSource.CLOSED) return;  // the browser is retrying
      // The browser gave up (an HTTP error): reconnect ourselves with since=<last seq>.
      self._es = null;
      if (!opened && !self._sseWorked && self.transport === 'auto' &&
          typeof global.WebSocket === 'function') {
        self._useSse = false;  // neither worked yet: the gateway may just be down
      }
      self._schedule();
    };
  };

  Dialog.prototype._restartSse = function () {
    if (this._es) this._es.close();
    this._es = null;
    this._setState('reconnecting');
    this._schedule();
  };

  Dialog.prototype._startPinger = function (ws) {
    var self = this;
    this._stopPinger();
    this._pinger = setInterval(function () {
      if (self._awaitingPong) {
        // Nothing came back since the last ping: the connection is dead without a close.
        ws.close(1000, 'no pong');
        return;
      }
      self._awaitingPong = true;
      ws.send('{"type":"ping"}');
    }, this.pingEvery);
  };

  Dialog.prototype._stopPinger = function () {
    clearInterval(this._pinger);
    this._pinger = null;
    this._awaitingPong = false;
  };

  // -- Api: the backend's HTTP API -------------------------------------------

  function ApiError(status, message) {
    this.name = 'ApiError';
    this.status = status;
    this.message = message;
  }
  ApiError.prototype = Object.create(Error.prototype);

  function Api(base) {
    this.base = base || '';
  }

  Api.prototype.request = function (method, path, body, token) {
    var headers = {};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (token) headers.Authorization = 'Bearer ' + token;
    return fetch(this.base + path, {
      method: method,
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body)
    }).then(function (response) {
      if (response.status === 204) return null;
      return response.json().then(function (data) {
        if (!response.ok) throw new ApiError(response.status, (data && data.error) || response.statusText);
        return data;
      }, function () {
        throw new ApiError(response.status, response.statusText);
      });
    });
  };

  // Operator (admin panel): token from login().
  Api.prototype.login = function (email, password) {
    return this.request('POST', '/api/auth/login', {email: email, password: password});
  };
  // options: {before: <activity cursor>, limit: N} (see Workspace below); none: the newest page.
  Api.prototype.dialogs = function (token, options) {
    options = options || {};
    return this.request('GET', '/api/dialogs' + query({before: options.before, limit: options.limit}),
                        undefined, token);
  };
  Api.prototype.send = function (token, dialogId, text) {
    return this.request('POST', '/api/dialogs/' + dialogId + '/messages', {text: text}, token);
  };
  Api.prototype.typing = function (token, dialogId) {
    return this.request('POST', '/api/dialogs/' + dialogId + '/typing', {}, token);
  };

  // Widget (site visitor): a guest token from createWidgetDialog().
  Api.prototype.createWidgetDialog = function (assistantId, parentOrigin) {
    var body = {assistant_id: assistantId};
    if (parentOrigin) body.parent_origin = parentOrigin;
    return this.request('POST', '/api/widget/dialogs', body);
  };
  Api.prototype.widgetSend = function (guestToken, dialogId, text) {
    return this.request('POST', '/api/widget/dialogs/' + dialogId + '/messages', {text: text}, guestToken);
  };
  Api.prototype.widgetTyping = function (guestToken, dialogId) {
    return this.request('POST', '/api/widget/dialogs/' + dialogId + '/typing', {}, guestToken);
  };

  // Call fn at most once per `ms` (typing notifications while a key is held down).
  function throttle(fn, ms) {
    var last = 0;
    return function () {
      var now = Date.now();
      if (now - last >= ms) {
        last = now;
        return fn.apply(this, arguments);
      }
    };
  }

  // == Workspace: the operator's inbox, read state, presence =================
  //
  // An Inbox is the operator's whole workspace on one socket (/ws/inbox): a snapshot
  // of the newest dialogs, then a `dialog` frame whenever one of them is created,
  // gets a message, is read or its visitor comes or goes. There is no `since`: every
  // (re)connect gets a fresh snapshot, which replaces the view. It reconnects with
  // jittered backoff after any drop and gives up only on a code no retry can fix.
  //
  //   var inbox = new ReplyX.Inbox({url: ReplyX.wsUrl('/ws/inbox', {token: jwt})});
  //   inbox.on('snapshot', function (s) { ... }); // {dialogs: [entry…], total}: the view was replaced
  //   inbox.on('dialog', function (entry, previous) { ... });  // one entry added or updated
  //   inbox.on('change', function (list) { ... });  // after either: inbox.list()
  //   inbox.on('state', function (s) { ... });      // 'connecting' | 'live' | 'reconnecting' | 'closed'
  //   inbox.on('closed', function (e) { ... });     // gave up: {code, reason}
  //   inbox.connect();
  //   inbox.dialogs   // {dialog_id: entry}; inbox.list(): entries, newest activity first
  //   inbox.older(api, jwt, 50)  // the next older page over HTTP, merged into the view
  //
  // An entry: {dialog_id, assistant_id, channel, created_at, last_seq, last_message:
  // {seq, sender, text, created_at} | null, operator_read_seq, visitor_read_seq, unread,
  // activity, visitor_online}.
  //
  // Dialog sockets emit the workspace's two per-dialog events:
  //   dialog.on('read', function (r) { ... });     // {dialog_id, side: 'operator'|'visitor', seq}
  //   dialog.on('presence', function (p) { ... }); // widget/site: {operators_online: N};
  //                                                // admin: {dialog_id, visitor_online: bool}
  // and read state is written over HTTP: api.read(jwt, id, seq), api.widgetRead(guest, id, seq).

  // A dialog's version: each commit that changes it moves one of these forward, none back.
  function notOlder(a, b) {
    return a.last_seq >= b.last_seq && a.operator_read_seq >= b.operator_read_seq &&
           a.visitor_read_seq >= b.visitor_read_seq;
  }

  function Inbox(options) {
    this.url = options.url;
    this.backoffInitial = options.backoffInitial || 500;   // ms
    this.backoffMax = options.backoffMax || 15000;
    this.pingEvery = options.pingEvery || 25000;
    this.fatalCodes = options.fatalCodes || FATAL_CODES;
    this.state = 'idle';
    this.dialogs = {};       // dialog_id → newest entry
    this.total = 0;          // dialogs of all the operator's assistants (the snapshot's, kept up)
    this.cursor = null;      // `before` of the next older page; null: nothing older
    this.snapshots = 0;
    this.closeCodes = [];
    this.connects = 0;
    this._handlers = {};
    this._delay = this.backoffInitial;
    this._ws = null;
    this._timer = null;
    this._pinger = null;
    this._awaitingPong = false;
    this._stopped = false;
    var self = this;
    this._onOnline = function () { if (self.state === 'reconnecting') self._reconnectNow(); };
  }

  // The connection plumbing an inbox shares with a dialog socket: events, state, the
  // jittered backoff and the ping that finds half-open connections.
  ['on', '_emit', '_setState', '_giveUp', '_schedule', '_reconnectNow', '_startPinger',
   '_stopPinger']
    .forEach(function (name) { Inbox.prototype[name] = Dialog.prototype[name]; });

  // The view, newest activity first.
  Inbox.prototype.list = function () {
    var list = [];
    for (var id in this.dialogs) list.push(this.dialogs[id]);
    list.sort(function (a, b) { return (b.activity - a.activity) || (b.dialog_id - a.dialog_id); });
    return list;
  };

  Inbox.prototype.get = function (dialogId) {
    return this.dialogs[dialogId] || null;
  };

  Inbox.prototype.hasOlder = function () {
    return this.cursor !== null;
  };

  Inbox.prototype.connect = function () {
    this._stopped = false;
    if (global.addEventListener) global.addEventListener('online', this._onOnline);
    this._open();
    return this;
  };

  Inbox.prototype.close = function () {
    this._stopped = true;
    clearTimeout(this._timer);
    this._stopPinger();
    if (global.removeEventListener) global.removeEventListener('online', this._onOnline);
    if (this._ws) this._ws.close(1000, 'bye');
    this._ws = null;
    if (this._es) this._es.close();  // SSE fallback (see _openSse)
    this._es = null;
    this._setState('closed');
  };

  Inbox.prototype._open = function () {
    var self = this;
    if (this._useSse || typeof global.WebSocket !== 'function') return this._openSse();
    this._setState(this.connects === 0 ? 'connecting' : 'reconnecting');
    var ws = new WebSocket(this.url);
    var opened = false;
    this._ws = ws;
    ws.onopen = function () { opened = self._wsWorked = true; self.connects += 1; };
    ws.onmessage = function (event) {
      if (ws === self._ws) self._frame(ws, event.data);
    };
    ws.onclose = function (event) {
      if (ws !== self._ws) return;
      self._ws = null;
      self._stopPinger();
      self.closeCodes.push(event.code);
      if (self._stopped) return;
      if (!opened && !self._wsWorked && typeof global.EventSource === 'function') {
        self._useSse = true;  // no socket ever upgraded here: try the event stream
        self._open();
        return;
      }
      if (self.fatalCodes[event.code]) {
        self._giveUp(event.code, event.reason);
        return;
      }
      self._setState('reconnecting');
      self._schedule();
    };
  };

  // -- Inbox over server-sent events: /sse/inbox, when WebSockets cannot be used --
  // Like Dialog's fallback; there is no resume point: every (re)connect, the browser's
  // own included, starts with a fresh snapshot.
  Inbox.prototype._openSse = function () {
    var self = this;
    this._setState(this.connects === 0 ? 'connecting' : 'reconnecting');
    if (this._es) this._es.close();
    var es = new EventSource(sseUrl(this.url));
    this._es = es;
    es.onopen = function () { if (es === self._es) self.connects += 1; };
    es.onmessage = function (event) { if (es === self._es) self._frame(null, event.data); };
    es.addEventListener('close', function (event) {
      if (es !== self._es) return;
      var info = {};
      try { info = JSON.parse(event.data); } catch (err) { /* keep {} */ }
      self.closeCodes.push(info.code);
      if (self.fatalCodes[info.code]) {
        es.close();
        self._es = null;
        self._giveUp(info.code, info.reason);
        return;
      }
      self._setState('reconnecting');  // the browser reconnects by itself
    });
    es.onerror = function () {
      if (es !== self._es || self._stopped) return;
      self._setState('reconnecting');
      if (es.readyState !== EventSource.CLOSED) return;  // the browser is retrying
      self._es = null;
      self._schedule();
    };
  };

  Inbox.prototype._frame = function (ws, raw) {
    var data;
    try { data = JSON.parse(raw); } catch (err) { return; }
    this._awaitingPong = false;
    if (data.type === 'snapshot') {
      this._snapshot(data);
    } else if (data.type === 'dialog') {
      this._upsert(data, true);
    } else if (data.type === 'ready') {
      this._delay = this.backoffInitial;
      if (ws) this._startPinger(ws);
      this._setState('live');
      this._emit('ready');
    }
  };

  Inbox.prototype._snapshot = function (data) {
    var dialogs = {};
    var oldest = null;
    for (var i = 0; i < data.dialogs.length; i++) {
      var entry = data.dialogs[i];
      dialogs[entry.dialog_id] = entry;
      if (oldest === null || entry.activity < oldest) oldest = entry.activity;
    }
    this.dialogs = dialogs;
    this.total = data.total;
    this.snapshots += 1;
    this.cursor = data.dialogs.length < data.total && oldest !== null ? oldest : null;
    this._emit('snapshot', {dialogs: this.list(), total: data.total});
    this._emit('change', this.list());
  };

  // live: a `dialog` frame (newest state by construction); else an entry paged over HTTP,
  // which is kept only if the view has nothing newer, and has no visitor_online of its own.
  Inbox.prototype._upsert = function (entry, live) {
    var known = this.dialogs[entry.dialog_id];
    if (!live && known) {
      if (!notOlder(entry, known)) return false;
      entry.visitor_online = known.visitor_online;
    }
    if (!known && live && entry.last_seq === 0) this.total += 1;  // a new dialog
    if (!live && entry.visitor_online === undefined) entry.visitor_online = false;
    this.dialogs[entry.dialog_id] = entry;
    this._emit('dialog', entry, known || null);
    this._emit('change', this.list());
    return true;
  };

  // The next older page (GET /api/dialogs?before=), merged into the view; resolves to its
  // entries. A snapshot that arrives meanwhile wins: the page is then dropped.
  Inbox.prototype.older = function (api, token, limit) {
    var self = this;
    if (this.cursor === null) return Promise.resolve([]);
    var snapshots = this.snapshots;
    return api.dialogs(token, {before: this.cursor, limit: limit || 50}).then(function (page) {
      if (self.snapshots !== snapshots) return [];
      self.cursor = page.next_before === undefined ? null : page.next_before;
      self.total = page.total;
      var added = [];
      for (var i = 0; i < page.dialogs.length; i++) {
        if (self._upsert(page.dialogs[i], false)) added.push(page.dialogs[i]);
      }
      if (!added.length) self._emit('change', self.list());
      return added;
    });
  };

  // Read state (forward-only on the server: a lower seq is a no-op, one past the end a 400).
  Api.prototype.read = function (token, dialogId, seq) {
    return this.request('POST', '/api/dialogs/' + dialogId + '/read', {seq: seq}, token);
  };
  // parentOrigin: the embedding page, when the widget runs in the product's iframe.
  Api.prototype.widgetRead = function (guestToken, dialogId, seq, parentOrigin) {
    var body = {seq: seq};
    if (parentOrigin) body.parent_origin = parentOrigin;
    return this.request('POST', '/api/widget/dialogs/' + dialogId + '/read', body, guestToken);
  };

  // == end of Workspace ======================================================

  global.ReplyX = {Dialog: Dialog, Api: Api, ApiError: ApiError, wsUrl: wsUrl, throttle: throttle,
                   FATAL_CODES: FATAL_CODES, sseUrl: sseUrl};
  global.ReplyX.Inbox = Inbox;
})(typeof window !== 'undefined' ? window : this);
