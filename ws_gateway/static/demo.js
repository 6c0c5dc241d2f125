// What both demo pages draw: the conversation, the typing line, the socket's state, errors.
// The pages differ only in who "we" are and in how a message is labelled.
var ReplyXDemo = (function () {
  'use strict';

  function $(id) { return document.getElementById(id); }

  // self: the sender this page speaks as (its own typing events are not shown);
  // label(m): the line above a message.
  function view(self, label) {
    var typingTimer = null;
    var seenSeq = 0;
    var ui = {
      $: $,
      showError: function (err) { $('error').textContent = err ? String(err.message || err) : ''; },
      setStatus: function (state) {
        $('status').textContent = state;
        $('status').className = state;
      },
      addMessage: function (m) {
        var li = document.createElement('li');
        li.className = 'message ' + m.sender;
        li.dataset.seq = m.seq;
        li.dataset.sender = m.sender;
        var meta = document.createElement('div');
        meta.className = 'meta';
        meta.textContent = label(m);
        var text = document.createElement('div');
        text.className = 'text';
        text.textContent = m.text;
        li.appendChild(meta);
        li.appendChild(text);
        $('messages').appendChild(li);
        ui.markSeen(seenSeq);
        li.scrollIntoView({block: 'end'});
      },
      // The other side has read up to seq: our messages up to it get a "seen" tick.
      markSeen: function (seq) {
        seenSeq = Math.max(seenSeq, seq || 0);
        var mine = document.querySelectorAll('#messages li[data-sender="' + self + '"]:not(.seen)');
        for (var i = 0; i < mine.length; i++) {
          if (Number(mine[i].dataset.seq) > seenSeq) continue;
          mine[i].classList.add('seen');
          var tick = document.createElement('span');
          tick.className = 'tick';
          tick.textContent = ' ✓ seen';
          mine[i].querySelector('.meta').appendChild(tick);
        }
      },
      // A new conversation on the same page: nothing of it is seen yet.
      resetSeen: function () { seenSeq = 0; },
      showTyping: function (t) {
        if (t.sender === self) return;
        $('typing').textContent = t.sender + ' is typing…';
        clearTimeout(typingTimer);
        typingTimer = setTimeout(function () { $('typing').textContent = ''; }, 3000);
      },
      // Draw what a ReplyX.Dialog receives.
      show: function (dialog) {
        dialog.on('message', ui.addMessage);
        dialog.on('typing', ui.showTyping);
        dialog.on('state', ui.setStatus);
      }
    };
    return ui;
  }

  // Marks one conversation read while the page is visible. want(seq): the page has shown
  // messages up to seq that the other side wrote. post(seq) returns a promise (Api.read /
  // Api.widgetRead). One request at a time, coalesced (a replay of 100 messages is one
  // POST), retried after a failure; read state is forward-only on the server, so a repeat
  // is harmless. stop() when the page leaves the conversation.
  function reader(post) {
    var wanted = 0;
    var sent = 0;
    var busy = false;
    var stopped = false;
    var timer = null;
    function flush() {
      timer = null;
      if (stopped || busy || wanted <= sent || document.visibilityState === 'hidden') return;
      var seq = wanted;
      busy = true;
      post(seq).then(function () {
        busy = false;
        sent = Math.max(sent, seq);
        schedule(0);
      }, function () {
        busy = false;
        schedule(3000);
      });
    }
    function schedule(ms) {
      if (timer === null && !stopped) timer = setTimeout(flush, ms);
    }
    function onVisibility() { schedule(0); }
    document.addEventListener('visibilitychange', onVisibility);
    return {
      want: function (seq) {
        if (seq > wanted) {
          wanted = seq;
          schedule(50);
        }
      },
      stop: function () {
        stopped = true;
        clearTimeout(timer);
        document.removeEventListener('visibilitychange', onVisibility);
      }
    };
  }

  return {view: view, reader: reader};
})();
