// What both demo pages draw: the conversation, the typing line, the socket's state, errors.
// The pages differ only in who "we" are and in how a message is labelled.
var ReplyXDemo = (function () {
  'use strict';

  function $(id) { return document.getElementById(id); }

  // self: the sender this page speaks as (its own typing events are not shown);
  // label(m): the line above a message.
  function view(self, label) {
    var typingTimer = null;
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
        li.scrollIntoView({block: 'end'});
      },
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

  return {view: view};
})();
